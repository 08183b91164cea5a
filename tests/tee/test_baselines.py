"""The earlier TEE-shielded schemes: exact against plain, and their device views as documented."""

from __future__ import annotations

import math

import pytest

import veil
from veil.attacks.audit import audit_run

SCHEMES = ("shielded", "tlg", "soter", "nnsplitter", "shadownet")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_tiny_matches_plain(scheme, preset):
    plain = veil.load(preset)
    m = veil.load(preset, scheme=scheme)
    ids = [[3, 17, 99, 5, 42, 7, 250, 11, 64, 2, 9, 130]]
    assert float((plain.logits(ids) - m.logits(ids)).abs().max()) <= 1e-4
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    assert ([g.token_ids for g in m.generate(prompts, max_new_tokens=12)]
            == [g.token_ids for g in plain.generate(prompts, max_new_tokens=12)])


def _matched(report, weights: bool) -> float:
    vals = [r.cos_matched for r in report.rows
            if not math.isnan(r.cos_matched) and r.name.endswith(".weight") == weights]
    return max(vals, default=0.0)


def test_audit_table_shape():
    """The docs/tee.md table's pattern on a tiny model: soter and nnsplitter leak in plain sight;
    tlg and shadownet only hide behind permutations (which MSP undoes); loro masks."""
    found = {s: audit_run("tiny-llama", s, [1, 2, 3, 4, 5], max_new_tokens=4)
             for s in ("loro", "tlg", "soter", "nnsplitter", "shadownet")}
    assert _matched(found["soter"], True) > 0.99 and _matched(found["soter"], False) > 0.99
    assert _matched(found["nnsplitter"], False) > 0.99 and _matched(found["nnsplitter"], True) > 0.3
    assert _matched(found["loro"], True) < 0.2
    with pytest.raises(veil.UnsupportedError):
        veil.load("tiny-llama", scheme="shielded").device_view()


@pytest.mark.default_model
@pytest.mark.parametrize("scheme", SCHEMES)
def test_default_same_tokens_as_plain(default_model, scheme):
    m = veil.load("default", scheme=scheme)
    ids = default_model.encode("The quick brown fox jumps over the lazy dog because")
    assert float((default_model.logits([ids]) - m.logits([ids])).abs().max()) <= 1e-3
    assert m.generate(ids, max_new_tokens=32).token_ids == \
        default_model.generate(ids, max_new_tokens=32).token_ids
