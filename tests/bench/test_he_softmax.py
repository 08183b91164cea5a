"""The HE softmax benchmark (veil/bench/he_softmax.py): each contender's ciphertext output against
its plaintext twin, the depth/set/refresh plan, the cost model, and the CLI writing its files.

Encrypted tests run on SMALL INSECURE parameters (`test-n8192`: N=8192, 10 levels of 33 bits —
below 128-bit security), allowed per test through VEIL_HE_ALLOW_INSECURE=1. Their 10 levels force
refreshes on every contender but power, so the refresh path is exercised too.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from veil.bench import he_softmax as hs
from veil.bench.he_track import Ops, PlainEngine
from veil.cli import app
from veil.errors import ConfigError
from veil.he import params as he_params

TEST_SET = "test-n8192"          # INSECURE: tests only
# max |decrypted − twin| on outputs ≤ 1 at the test set's 33-bit scale: power's noise is
# ~4e-6; the exp baselines' reciprocal input reaches e^-8, so 1/z turns η into η/z (~1e-3); the
# squaring method multiplies its input's relative noise by 2^15 (~6e-3)
TWIN_TOL = {"power": 1e-4, "taylor-exp": 5e-3, "squaring": 2e-2}


@pytest.fixture
def insecure(monkeypatch):
    monkeypatch.setenv(he_params.INSECURE_ENV, "1")
    return he_params.get(TEST_SET)


@pytest.mark.parametrize("contender", hs.CONTENDERS)
def test_encrypted_output_matches_the_plaintext_twin(insecure, contender):
    engine = hs._engine_factory()
    try:
        r = hs.measure(hs.Setup(), contender, 8, 1, engine, params=insecure)
    finally:
        for eng in engine.engines.values():
            eng.close()
    assert not r["secure"] and r["set"] == TEST_SET
    assert r["err_vs_twin"] <= TWIN_TOL[contender]
    # the twin is the same code: the same refreshes, the same ciphertext operations
    assert r["refreshes_per_ct"] == r["planned_refreshes"]
    if contender == "power":
        assert r["refreshes_per_ct"] == 0          # depth 9 fits the 10 levels
    else:
        assert r["refreshes_per_ct"] >= 2          # depth 26/33 on 10 levels
    for kind in ("ct_mul", "rotate"):
        assert r["engine_counts"][kind] == r["ops_per_ct"][kind]
    if contender == "power":
        assert r["err_vs_exact"] <= 1e-3 * r["max_output"] + TWIN_TOL["power"]


def test_depth_set_and_refresh_plan():
    s = hs.Setup()
    plans = {c: hs.plan_for(s, c) for c in hs.CONTENDERS}
    # Goldschmidt: z ≥ ε/(ε+B⁴) = 0.2 → 5 iterations; z ≥ ≈e^-8 → 15
    assert [plans[c].gs_iters for c in hs.CONTENDERS] == [5, 15, 15]
    assert plans["squaring"].exp["k"] == 15 and plans["squaring"].exp["exp_rel_err"] <= s.tol
    t = plans["taylor-exp"].exp
    assert t["exp_rel_err"] <= s.tol
    x = np.linspace(s.lo, 0, 101)
    assert np.allclose(hs.taylor_exp_plain(x, t["degree"], t["r"]), np.exp(x), rtol=s.tol)
    depths = {c: hs.depth(s, plans[c]) for c in hs.CONTENDERS}
    # power: s⁴ 2 + weights 1 + Goldschmidt 5 + product 1; the exp baselines: their exp stage,
    # weights 1, the magnified reciprocal input's return 1, Goldschmidt 15, product 1
    assert depths == {"power": 9, "taylor-exp": t["exp_depth"] + 18, "squaring": 15 + 18}
    assert hs.choose_set(depths["power"], 1024) == (he_params.get("n16384"), False)
    assert hs.choose_set(depths["power"], 16384) == (he_params.get("n32768"), False)
    for c in ("taylor-exp", "squaring"):
        assert hs.choose_set(depths[c], 128) == (he_params.get("n32768"), True)
    # one refresh each beyond the deepest set (the plan: the same code on float64)
    n32768 = he_params.get("n32768")
    pk = hs.Packing(128, n32768.slots)
    for c, want in (("taylor-exp", 1), ("squaring", 1)):
        m = hs.scores(s, c, pk)
        out, counts = hs.twin(s, plans[c], n32768, pk, m)
        assert counts["refreshes"] == want
        assert np.max(np.abs(out - hs.exact(s, c, m, pk))) < 5 * s.tol


def test_strided_packing_sums_rows_without_a_mask():
    pk = hs.Packing(8, 64)
    assert pk.R == 8 and pk.steps == [8, 16, 32]
    m = np.arange(64.0).reshape(8, 8)
    assert np.array_equal(pk.unpack(pk.pack(m)), m)
    ops = Ops(PlainEngine(3, 64))
    got = pk.unpack(ops.decrypt(ops.row_sum(ops.encrypt(pk.pack(m)), pk.R, pk.L)))
    assert np.allclose(got, m.sum(1, keepdims=True) * np.ones((1, 8)))
    assert ops.level(ops.row_sum(ops.encrypt(pk.pack(m)), pk.R, pk.L)) == 3
    assert list(hs.Packing(4, 64).rows) == [i % 4 for i in range(16)]   # more rows than a head
    with pytest.raises(ConfigError):
        hs.Packing(12, 64)


def test_cost_model_arithmetic():
    measured = [
        {"contender": "power", "L": 1024, "rows_per_ct": 8, "seconds": 0.5},
        {"contender": "taylor-exp", "L": 1024, "rows_per_ct": 16, "seconds": 7.0},
        {"contender": "squaring", "L": 1024, "rows_per_ct": 16, "seconds": 10.0},
    ]
    rows = {(t["shape"], t["L"]): t for t in hs.totals(measured)}
    p = rows[("pythia-70m", 1024)]
    assert p["power"] == {"ciphertexts": 6 * 8 * 1024 // 8, "seconds": 0.5 * 6144}
    assert p["taylor-exp"]["ciphertexts"] == 3072
    assert p["taylor-exp/power"] == pytest.approx(7.0 * 3072 / (0.5 * 6144))
    assert p["squaring/power"] == pytest.approx(10.0 * 3072 / (0.5 * 6144))
    assert p["paper_ratios"]["taylor-exp/power"] == pytest.approx(83.9 / 8.6)
    assert rows[("llama-7b", 1024)]["power"]["ciphertexts"] == 32 * 32 * 1024 // 8
    assert "paper" not in rows[("llama-7b", 1024)]
    # a ciphertext holding rows of several heads: rows, not heads, are what never split
    assert hs.n_ciphertexts("pythia-70m", 16, 16384) == 1       # 768 rows, 1024 per ct
    assert hs.n_ciphertexts("llama-7b", 128, 16384) == 32 * 32 * 128 // 128  # one head a ct


def test_cli_writes_its_files(insecure, monkeypatch, tmp_path):
    """`veil bench he-softmax` end to end, on the insecure test set (labelled in the table)."""
    monkeypatch.setattr(hs, "run", functools.partial(hs.run, params=insecure))
    res = CliRunner().invoke(app, ["bench", "he-softmax", "--repeats", "1", "--lengths", "4,8",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"he_softmax.{ext}").stat().st_size > 0
    data = json.loads((tmp_path / "he_softmax.json").read_text())
    assert {(r["contender"], r["L"]) for r in data["measured"]} == {
        (c, L) for c in hs.CONTENDERS for L in (4, 8)}
    md = (tmp_path / "he_softmax.md").read_text()
    assert "INSECURE" in md and "| pythia-70m | 8 |" in md
    bad = CliRunner().invoke(app, ["bench", "he-softmax", "--lengths", "4,x"])
    assert bad.exit_code == 2


@pytest.mark.slow
def test_secure_sets_end_to_end(tmp_path):
    """The real path at a tiny length: n16384 for power, n32768 with one refresh for the others."""
    res = hs.run((4,), 1, log=lambda _: None)
    by = {r["contender"]: r for r in res["measured"]}
    assert by["power"]["set"] == "n16384" and by["power"]["refreshes_per_ct"] == 0
    for c in ("taylor-exp", "squaring"):
        assert by[c]["set"] == "n32768" and by[c]["refreshes_per_ct"] == 1
    # taylor-exp: CKKS noise magnified by its reciprocal input (down to e^-8): measured 1e-4–1e-3
    assert by["power"]["err_vs_twin"] < 1e-5 and by["taylor-exp"]["err_vs_twin"] < 3e-3
    assert [p.name for p in hs.write(res, tmp_path)] == ["he_softmax.json", "he_softmax.md",
                                                         "he_softmax.png"]
