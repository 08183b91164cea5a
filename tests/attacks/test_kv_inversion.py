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


def _device_cache_run(model: str, scheme: str, ids: list[int], **options):
    """Generate under a TEE scheme with the device recording; (layer-0 value cache as the device
    holds it, the tokens in its slots)."""
    with veil.load(model, scheme=scheme, record_view=True, **options) as m:
        r = m.generate(ids, max_new_tokens=4, ignore_eos=True)
        return m.device_view().resident["kv_cache.v"][0, 0], ids + r.token_ids[:-1]


@pytest.mark.parametrize("scheme, options, kind", [
    ("loro", {}, "norms"),                              # Haar rotations keep each head's norm
    ("loro", {"attention_mixing": "permute"}, "sorted"),
    ("tlg", {}, "sorted"),
])
def test_head_block_mixing_falls_to_invariant_signatures(scheme, options, kind):
    """The device's cache under LoRO's and TLG's head mixings: the plain attack reads nothing,
    per-head signatures the mixing cannot change (sorted entries under permutations, norms under
    rotations) read every token back."""
    from veil.attacks.kv_inversion import invert_mixed_values

    plain = veil.load("tiny-llama")
    ids = torch.randint(0, plain.cfg.vocab_size, (30,),
                        generator=torch.Generator().manual_seed(3)).tolist()
    v0, tokens = _device_cache_run("tiny-llama", scheme, ids, **options)
    positions = list(range(len(tokens)))
    assert recovery_rate(invert_values(plain.cfg, plain.ops.w, v0, positions), tokens) < 0.2
    got = invert_mixed_values(plain.cfg, plain.ops.w, v0, positions, kind)
    assert recovery_rate(got, tokens) >= 0.99


@pytest.mark.default_model
def test_loro_cache_of_the_default_model_falls_to_head_norms(default_model):
    """The figure `veil explain --scheme loro` and docs/tee.md state: every token of a chat
    conversation read back from the rotated cache by per-head norms."""
    from veil.attacks.kv_inversion import invert_mixed_values

    ids = default_model.encode("My doctor said the biopsy results came back positive.", chat=True)
    v0, tokens = _device_cache_run("default", "loro", ids)
    got = invert_mixed_values(default_model.cfg, default_model.ops.w, v0,
                              list(range(len(tokens))), "norms")
    assert recovery_rate(got, tokens) >= 0.99
