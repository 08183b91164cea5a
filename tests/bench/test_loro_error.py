"""The LoRO error benchmark on a tiny preset: its draws are independent (new secrets each), its
table reads the stated tolerance, and the errors it reports are real logit differences."""

import json

from veil.bench.loro_error import DTYPES, rerender, run, stated_tolerance


def test_loro_error_bench_tiny(tmp_path):
    paths = run("tiny-gpt2", 2, tmp_path)
    assert [p.name for p in paths] == ["loro_error.json", "loro_error.md", "loro_error.png"]
    res = json.loads(paths[0].read_text())
    assert res["tolerance"] == stated_tolerance("tiny-gpt2") == 1e-4
    for d in DTYPES:
        errs = [e for draw in res["errors"][d] for e in draw]
        assert len(errs) == 2 * len(res["prompts"])
        assert all(0 < e <= res["tolerance"] for e in errs)   # rounding, not exactness, not garbage
        assert len(set(errs)) == len(errs)                      # each draw its own secrets
    md = paths[1].read_text()
    assert "| float32 | all |" in md and "0/6" in md
    res["tolerance"] = 1.0          # re-rendering takes the registry's tolerance, not the file's
    paths[0].write_text(json.dumps(res))
    rerender(tmp_path)
    assert json.loads(paths[0].read_text())["tolerance"] == 1e-4
