"""`veil bench he` end to end on a tiny Power-Softmax model (random weights, embedding scaled so
logits spread) with SMALL INSECURE parameters (`test-n4096`, allowed per test through
VEIL_HE_ALLOW_INSECURE=1): every part but the default-model layer, the resumable agreement log, the
projection's check against the measured forward, and the files it writes."""

from __future__ import annotations

import json

import pytest

from veil.bench import he as bench_he
from veil.he import params as he_params
from veil.model import native, zoo

TEST_SET = "test-n4096"          # INSECURE: tests only


@pytest.mark.slow
def test_bench_he_parts_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv(he_params.INSECURE_ENV, "1")
    monkeypatch.setenv("VEIL_CACHE", str(tmp_path / "cache"))
    cfg = zoo.preset("tiny-power")
    w = zoo.random_weights(cfg)
    w["embed.weight"] = w["embed.weight"] * 6
    folder = native.save_native(tmp_path / "m", cfg, w)
    ids = [(7 * i + 3) % 250 + 3 for i in range(64)]
    res = bench_he.run(lengths=(4, 6), repeats=1, prompts=3, agree_tokens=5, new_tokens=2,
                       parts=("forward", "generation", "agreement", "projection"),
                       progress=False, folder=folder, params=TEST_SET, ids=ids)
    assert res["meta"]["secure"] is False
    rows = res["forward"]["rows"]
    assert [(r["tokens"], r["mask"]) for r in rows] == [(4, True), (6, True), (6, False)]
    for r in rows:
        assert r["argmax_equal"] and r["max_logit_error"] < 5e-2
        assert r["refreshes"] >= 1 and r["bytes_to_server"] > 0 and r["bytes_to_client"] > 0
        assert r["seconds"]["min"] <= r["seconds"]["median"] <= r["seconds"]["max"]
    assert res["generation"]["same_tokens_as_plain"] and res["generation"]["new_tokens"] == 2
    a = res["agreement"]
    assert a["prompts"] == 3 and a["encrypted_vs_plain"] == 1.0 and a["clear_vs_plain"] == 1.0
    log = bench_he._agreement_log(folder, TEST_SET, 5)
    assert len(log.read_text().splitlines()) == 3
    # resumed, not recomputed: a fourth prompt adds one line
    with __import__("veil").load(str(folder)) as plain:
        again = bench_he.bench_agreement(folder, 4, 5, ids, plain, progress=False, params=TEST_SET)
    assert again["prompts"] == 4 and len(log.read_text().splitlines()) == 4
    check = res["projection"]["check"]
    for kind, (planned, measured) in check["counts (plan, measured)"].items():
        assert planned == measured, kind
    assert 0.3 < check["projected_s"] / check["measured_server_s"] < 3
    py = res["projection"]["pythia"]
    assert py["params"] == "n16384" and py["plan"]["refreshes"] > 0 and py["total_s"] > 0
    paths = bench_he.write(res, tmp_path / "out")
    md = paths[1].read_text()
    assert "INSECURE test set" in md and "Next-token agreement" in md and "Projection" in md
    assert json.loads(paths[0].read_text())["forward"]["rows"][0]["tokens"] == 4
