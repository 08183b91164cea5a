"""KV-cache inversion against a cache kept in the clear: the conversation comes back exactly."""

from __future__ import annotations

import pytest
import torch

import veil
from conftest import FAMILIES
from veil.attacks.kv_inversion import invert_values, recovery_rate
from veil.backends.plain import KVCache, TorchOps
from veil.model.forward import forward
from veil.model.ops import Step


def _plain_cache(m, ids: list[int]) -> KVCache:
    """The KV cache a plain run of `ids` leaves behind (what a memory scraper reads)."""
    ops = TorchOps(m.cfg, m.ops.w)
    cache = KVCache(m.cfg, 1, len(ids))
    x = torch.tensor([ids])
    with torch.inference_mode():
        forward(m.cfg, ops, x, Step(torch.arange(len(ids))[None], None, 0), cache)
    return cache


@pytest.mark.parametrize("preset", FAMILIES)
def test_a_plain_cache_gives_the_conversation_back(preset):
    with veil.load(preset) as m:
        # repeats included: every occurrence is read off on its own
        ids = torch.randint(0, m.cfg.vocab_size, (40,),
                            generator=torch.Generator().manual_seed(1)).tolist() + [7, 7, 7]
        cache = _plain_cache(m, ids)
        got = invert_values(m.cfg, m.ops.w, cache.v[0, 0], list(range(len(ids))))
        assert recovery_rate(got, ids) >= 0.99


@pytest.mark.default_model
def test_a_plain_cache_of_the_default_model_gives_the_conversation_back(default_model):
    ids = default_model.encode("My doctor said the biopsy results came back positive.",
                               chat=True)
    cache = _plain_cache(default_model, ids)
    got = invert_values(default_model.cfg, default_model.ops.w, cache.v[0, 0],
                        list(range(len(ids))))
    assert recovery_rate(got, ids) >= 0.99
    assert default_model.decode(got) == default_model.decode(ids)
