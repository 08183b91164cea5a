"""Smoke test: each benchmark suite runs end to end on a tiny config and writes its three files."""

from __future__ import annotations

import json

from conftest import make_hf_model
from veil.bench.harness import SUITES, run_suite


def test_suites_smoke(tmp_path):
    folder = tmp_path / "tiny-llama"
    make_hf_model("tiny-llama").save_pretrained(folder)
    for suite in SUITES:
        paths = run_suite(suite, model=str(folder), repeats=1, new_tokens=4, out_dir=tmp_path / "out")
        assert [p.suffix for p in paths] == [".json", ".md", ".png"]
        rows = json.loads(paths[0].read_text())["rows"]
        assert {r["scheme"] for r in rows} == {"plain", "transformers"}
        assert all(r["median"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
        assert all(r["same_tokens_as_plain"] for r in rows)
        assert rows[1]["max_abs_logit_err_vs_plain"] < 1e-4
