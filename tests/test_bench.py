"""Smoke tests: each benchmark suite runs end to end on a tiny config and writes its three files."""

from __future__ import annotations

import json

import pytest

from conftest import make_hf_model
from veil.bench.harness import SUITES, run_suite
from veil.errors import ConfigError


def test_suites_are_the_tested_ones():
    # mpc: tests/mpc/test_costs.py; kv-inversion: below; stealing:
    # tests/attacks/test_stealing.py::test_the_stealing_evaluation_runs_end_to_end
    assert set(SUITES) == {"plain-vs-hf", "tee", "mpc", "mpc-fused", "kv-inversion", "stealing"}


def test_kv_inversion_smoke(tmp_path):
    """The attack benchmark on a few short windows of a tiny model: every contender in both
    views, and the rows say what the tests assert on their own (plain and the paper's
    permutations read whole; the default padded mode not)."""
    from veil.bench.kv_inversion import CONTENDERS, run

    paths = run("tiny-llama", count=2, window=24, known=4, long_count=1, long_window=40,
                out_dir=tmp_path)
    assert [p.suffix for p in paths] == [".json", ".md", ".png"]
    data = json.loads(paths[0].read_text())
    rows = {(r["label"], r["view"]): r for r in data["rows"]}
    assert len(rows) == 2 * len(CONTENDERS)
    assert rows[("plain", "snapshot")]["mean"] == 1.0
    assert rows[("kvshield-paper (permute, fold)", "snapshot")]["whole_windows"] == 1.0
    assert rows[("kvshield", "snapshot")]["mean"] < 0.5
    assert rows[("kvshield", "device")]["best"] == "inputs"
    assert rows[("shadownet", "snapshot")]["best"] is None
    assert {r["label"] for r in data["long_rows"]} == {"kvshield", "kvshield pad_scale=1"}
    assert "| kvshield | snapshot |" in paths[1].read_text()


@pytest.mark.slow
def test_plain_vs_hf_smoke(tmp_path):
    folder = tmp_path / "tiny-llama"
    make_hf_model("tiny-llama").save_pretrained(folder)
    paths = run_suite("plain-vs-hf", model=str(folder), repeats=1, new_tokens=4, out_dir=tmp_path / "out")
    assert [p.suffix for p in paths] == [".json", ".md", ".png"]
    rows = json.loads(paths[0].read_text())["rows"]
    assert {r["scheme"] for r in rows} == {"plain", "transformers"}
    assert all(r["median"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    assert all(r["same_tokens_as_plain"] for r in rows)
    assert rows[1]["max_abs_logit_err_vs_plain"] < 1e-4


@pytest.mark.slow
def test_tee_smoke(tmp_path):
    paths = run_suite("tee", model="tiny-llama", repeats=1, new_tokens=4, out_dir=tmp_path)
    every = json.loads(paths[0].read_text())["rows"]
    rows = {r["scheme"]: r for r in every if r["suite"] == "tee"}
    assert set(rows) == {"plain", "shielded", "loro", "loro-paper", "loro-f64", "loro-block", "tlg",
                         "soter", "nnsplitter", "shadownet", "kvshield", "kvshield-paper"}
    # the user's path: nothing pinned, veil's placement; every row gives plain's tokens
    defaults = {r["scheme"]: r for r in every if r["suite"] == "tee-defaults"}
    assert set(defaults) == {"plain", "loro", "loro · device thread"}
    assert all(r["same_tokens_as_plain"] and r["median"] > 0 for r in defaults.values())
    # a tiny model's device stays a thread unless asked otherwise (veil/tee/placement.py)
    assert defaults["loro"]["device"] == "thread" and defaults["plain"]["beside_thread_device"]
    assert all(r["same_tokens_as_plain"] and r["median"] > 0 for r in rows.values())
    assert rows["plain"]["enclave_flop_share"] == 0 and rows["shielded"]["enclave_flop_share"] == 1
    loro = rows["loro"]
    # per decode step: 5 round trips per layer + embedding + head (tiny-llama: 2 layers)
    assert loro["round_trips_per_decode_token"] == 5 * 2 + 2
    assert loro["bytes_per_decode_token"] > 0 and loro["offline_pad_mflop_per_token"] > 0
    assert loro["resident_secret_mib_no_multiplexing"] > 0
    # each row carries the cost record the CLI prints (veil.cost.Cost.row), split counters included
    assert loro["last_cost"]["scheme"] == "loro" and loro["last_cost"]["split_round_trips"] > 0
    assert "split_round_trips" not in rows["plain"]["last_cost"]
    # the whole model in the TEE is the slowest projection of a prefill
    assert max(rows.values(), key=lambda r: r["projected_prefill_vs_accel"])["scheme"] == "shielded"
    text = paths[1].read_text()
    assert "Projected onto" in text and "| loro |" in text and "Default settings" in text


def test_tee_suite_refuses_a_bad_hardware_profile(tmp_path):
    bad = tmp_path / "hw.json"
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ConfigError, match="hardware profile"):
        run_suite("tee", model="tiny-llama", repeats=1, new_tokens=4, out_dir=tmp_path, hardware=bad)
