"""The earlier TEE-shielded schemes: their device views as documented, and the default model under
each (the tiny presets are in the conformance suite)."""

from __future__ import annotations

import math

import pytest

import veil
from conftest import assert_logits_close
from veil.attacks.audit import audit_run
from veil.schemes import get

SCHEMES = ("shielded", "tlg", "soter", "nnsplitter", "shadownet")


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
    """The default model under each scheme: logits within the scheme's declared tolerance, and
    plain's greedy tokens (the tiny presets: tests/test_conformance.py)."""
    with veil.load("default", scheme=scheme) as m:
        ids = default_model.encode("The quick brown fox jumps over the lazy dog because")
        assert_logits_close(m.logits([ids]), default_model.logits([ids]),
                            get(scheme).tolerance.default)
        assert m.generate(ids, max_new_tokens=32).token_ids == \
            default_model.generate(ids, max_new_tokens=32).token_ids
