"""`veil train merge` on a tiny model: the whole recipe, resuming after an interruption, and
checkpoints that belong to another run or are damaged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import veil
from veil.errors import CheckpointError
from veil.model import zoo
from veil.train.merge_recipe import MergeRecipe, ce_loss, run_recipe
from veil.train.trainer import Run, TrainSettings, train

TOKENS = {"train": np.random.default_rng(0).integers(0, 256, 4000),
          "heldout": np.random.default_rng(1).integers(0, 256, 600)}


def tiny_recipe(**kw) -> MergeRecipe:
    s = TrainSettings(steps=4, batch=2, seq=32, checkpoint_every=2, lr=1e-3)
    return MergeRecipe(model="tiny-gpt2", layers=0, context=32, stage1=s, stage2=s,
                       eval_windows=2, **kw)


@pytest.mark.slow
def test_recipe_end_to_end(tmp_path):
    table = run_recipe(tiny_recipe(), tmp_path, progress=False, tokens=TOKENS)
    names = [r["model"] for r in table["rows"]]
    assert names == ["base (fine-tuned)", "ER without training", "MERGE student (merge)"]
    for r in table["rows"]:
        assert np.isfinite(r["perplexity"]) and 0 <= r["free_running_accuracy"] <= 1
    merged = veil.load(tmp_path / "merged")
    assert merged.cfg.merged and merged.cfg.generation == "embedding_resend"
    assert (tmp_path / "quality.json").is_file()
    # running it again resumes every stage as finished: same table, no training
    again = run_recipe(tiny_recipe(), tmp_path, progress=False, tokens=TOKENS)
    assert again["rows"] == table["rows"]


def _stage(folder, settings, fail_at=None):
    cfg = zoo.preset("tiny-llama").with_(max_seq_len=32)
    params = {k: v.clone() for k, v in zoo.random_weights(cfg).items()}
    loss = ce_loss(cfg)

    def flaky(p, ids, gen):
        if fail_at is not None and int(gen.initial_seed()) % 1_000_003 == fail_at:
            raise KeyboardInterrupt
        return loss(p, ids, gen)
    train(params, flaky, TOKENS["train"], settings, Run(folder, settings, {"t": 1}),
          progress=False)
    return params


def test_resume_after_interruption_gives_the_uninterrupted_result(tmp_path):
    s = TrainSettings(steps=6, batch=2, seq=16, checkpoint_every=2, lr=1e-3, seed=3)
    ref = _stage(tmp_path / "a", s)
    with pytest.raises(KeyboardInterrupt):
        _stage(tmp_path / "b", s, fail_at=3)
    resumed = _stage(tmp_path / "b", s)
    for k in ref:
        assert torch.allclose(ref[k], resumed[k], atol=1e-6), k


def test_foreign_or_damaged_checkpoint_is_refused(tmp_path):
    s = TrainSettings(steps=2, batch=2, seq=16, checkpoint_every=1)
    _stage(tmp_path / "r", s)
    with pytest.raises(CheckpointError, match="different run"):
        _stage(tmp_path / "r", TrainSettings(steps=3, batch=2, seq=16, checkpoint_every=1))
    (tmp_path / "r" / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        _stage(tmp_path / "r", s)
