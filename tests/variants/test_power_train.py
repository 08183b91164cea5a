"""`veil train power` on tiny models: the conversion target resumes after an interruption to the
uninterrupted result, the small target trains and loads, and the recipe's settings are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import veil
from veil.errors import ConfigError
from veil.model import native
from veil.train import power_recipe
from veil.train.power_recipe import PowerRecipe, run_recipe
from veil.train.trainer import TrainSettings

TOKENS = {"train": np.random.default_rng(0).integers(0, 256, 4000),
          "heldout": np.random.default_rng(1).integers(0, 256, 600)}
TINY = TrainSettings(steps=4, batch=2, seq=16, checkpoint_every=2, lr=1e-3, warmup=1)


def _convert(folder, fail_at=None, monkeypatch=None):
    r = PowerRecipe(target="default", model="tiny-llama", settings=TINY, context=32)
    if fail_at is not None:
        real = power_recipe.power_loss

        def flaky(cfg, rec, teacher):
            inner = real(cfg, rec, teacher)

            def loss(p, ids, gen):
                if int(gen.initial_seed()) % 1_000_003 == fail_at:
                    raise KeyboardInterrupt
                return inner(p, ids, gen)
            return loss
        monkeypatch.setattr(power_recipe, "power_loss", flaky)
    return run_recipe(r, folder, progress=False, tokens=TOKENS)


def test_conversion_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    ref = native.load_native(_convert(tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        _convert(tmp_path / "b", fail_at=3, monkeypatch=monkeypatch)
    assert (tmp_path / "b" / "run" / "state.json").is_file()      # the step-2 checkpoint
    monkeypatch.undo()
    got = native.load_native(_convert(tmp_path / "b"))
    assert got[0] == ref[0] and got[0].attention == "power" and got[0].activation == "poly"
    for k in ref[1]:
        assert torch.allclose(ref[1][k], got[1][k], atol=1e-6), k
    log = (tmp_path / "b" / "run" / "state.json").read_text()
    assert '"range"' in log and '"kl"' in log


def test_small_target_trains_and_loads(tmp_path):
    r = PowerRecipe(target="small", model="tiny-llama", settings=TINY, context=32, d_model=16,
                    n_heads=2, d_ff=32)
    folder = run_recipe(r, tmp_path, progress=False, tokens=TOKENS)
    with veil.load(folder) as m:
        cfg = m.cfg
        assert (cfg.n_layers, cfg.d_model, cfg.attention, cfg.norm, cfg.mlp) == (
            2, 16, "power", "poly", "plain")
        assert torch.isfinite(m.logits([[1, 2, 3, 4]])).all()


def test_recipe_checks_its_settings():
    with pytest.raises(ConfigError, match="target"):
        PowerRecipe(target="large")
    with pytest.raises(ConfigError, match="baseline"):
        PowerRecipe(target="default", softmax=True)
    with pytest.raises(ConfigError, match="norm"):
        PowerRecipe(norm="layer")
    with pytest.raises(ConfigError, match="context"):
        PowerRecipe(target="small", context=32)


def test_quality_rows_compare_against_the_reference(tmp_path):
    from veil.model import zoo
    from veil.train.power_recipe import Row, markdown, quality_rows

    base = zoo.preset("tiny-llama").with_(max_seq_len=32)
    folders = {"base": native.save_native(tmp_path / "b", base, zoo.random_weights(base))}
    r = PowerRecipe(target="default", model="tiny-llama", settings=TINY, context=32)
    folders["power"] = run_recipe(r, tmp_path / "p", progress=False, tokens=TOKENS)
    rows = [Row("base", str(folders["base"]), "base"),
            Row("power", str(folders["power"]), "base")]
    table = quality_rows(rows, TOKENS["heldout"], window=15, windows=4)
    base_row, power_row = table["rows"]
    assert base_row["greedy_agreement"] == 1.0 and base_row["outside"] == {}
    assert 0 <= power_row["greedy_agreement"] <= 1 and np.isfinite(power_row["perplexity"])
    assert set(power_row["outside"]) == {"scores", "rows", "act"} and power_row["z_peak"] > 0
    text = markdown(table, {"power": {"steps": 4}})
    assert "| power |" in text and "—" in text
    with pytest.raises(ConfigError, match="reference"):
        quality_rows([Row("power", str(folders["power"]), "base")], TOKENS["heldout"], 15, 4)


def test_quality_table_without_training_needs_trained_models(tmp_path, monkeypatch):
    monkeypatch.setenv("VEIL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="not trained; run without --no-train"):
        power_recipe.main(["--no-train", "--out", str(tmp_path / "out")])
    with pytest.raises(ConfigError, match="range_weight and range_rows must be ≥ 0"):
        PowerRecipe(range_rows=-1.0)
