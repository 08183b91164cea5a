"""Per-category cost under SPU (eager execution) and the bench suite's machinery on a tiny model
with real party processes over TCP."""

from __future__ import annotations

from veil.bench.mpc import compose, markdown, measure
from veil.mpc.eager import CATEGORIES


def test_merge_removes_the_costs_it_claims_to_remove():
    msl = 12
    vanilla = measure("vanilla", msl, 2, timeout_s=300, base="tiny-gpt2")
    merge = measure("merge", msl, 2, timeout_s=300, base="tiny-gpt2")
    for parties in (vanilla, merge):
        assert len(parties) == 2
        for p in parties:
            assert {"prompt", "decode0", "decode1"} <= set(p["phases"])
            assert set(p["phases"]["prompt"]["categories"]) == set(CATEGORIES)
    v, m = compose(vanilla, msl), compose(merge, msl)
    vd = vanilla[1]["phases"]["decode1"]["categories"]
    md = merge[1]["phases"]["decode1"]["categories"]
    # vanilla decode: a one-hot embedding product, an argmax, softmax and norms — all traffic
    assert vd["embedding"]["send_bytes"] > 0 and vd["sampling"]["send_actions"] > 0
    assert vd["norm"]["send_actions"] > 0 and vd["attention"]["send_actions"] > 0
    # MERGE decode: no embedding product (a public-position lookup), no sampling in the loop,
    # the attention is one product with the owner's table
    assert md["embedding"]["send_bytes"] == 0 and md["sampling"]["calls"] == 0
    assert md["attention"]["send_actions"] < vd["attention"]["send_actions"]
    assert "head" in merge[1]["phases"] and "head" not in vanilla[1]["phases"]
    assert v["total_rounds"] > m["total_rounds"] and v["total_bytes"] > m["total_bytes"]
    rows = [{"msl": msl, "contender": "vanilla", **v}, {"msl": msl, "contender": "merge", **m}]
    table = markdown(rows, {"when": "today", "machine": "test", "base": "tiny-gpt2"})
    assert "| 12 | merge |" in table and "1.00×" in table
