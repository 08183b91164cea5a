"""KV-cache inversion against a cache kept in the clear: the conversation comes back exactly."""

from __future__ import annotations

import pytest
import torch

import veil
from conftest import FAMILIES
from veil.attacks.kv_inversion import invert_values, layer0_values, recovery_rate


@pytest.mark.parametrize("preset", FAMILIES)
def test_a_plain_cache_gives_the_conversation_back(preset):
    with veil.load(preset) as m:
        # repeats included: every occurrence is read off on its own
        ids = torch.randint(0, m.cfg.vocab_size, (40,),
                            generator=torch.Generator().manual_seed(1)).tolist() + [7, 7, 7]
        v0, tokens = layer0_values(preset, "plain", ids, 1)      # one token: no decode slot
        assert tokens == ids
        got = invert_values(m.cfg, m.ops.w, v0, list(range(len(ids))))
        assert recovery_rate(got, ids) >= 0.99


@pytest.mark.default_model
def test_a_plain_cache_of_the_default_model_gives_the_conversation_back(default_model):
    ids = default_model.encode("My doctor said the biopsy results came back positive.",
                               chat=True)
    v0, _ = layer0_values("default", "plain", ids, 1)
    got = invert_values(default_model.cfg, default_model.ops.w, v0, list(range(len(ids))))
    assert recovery_rate(got, ids) >= 0.99
    assert default_model.decode(got) == default_model.decode(ids)


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
    v0, tokens = layer0_values("tiny-llama", scheme, ids, 4, **options)
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
    v0, tokens = layer0_values("default", "loro", ids, 4)
    got = invert_mixed_values(default_model.cfg, default_model.ops.w, v0,
                              list(range(len(tokens))), "norms")
    assert recovery_rate(got, tokens) >= 0.99


def test_the_cli_reports_each_attack_and_refuses_schemes_without_a_device_cache():
    from typer.testing import CliRunner

    from veil.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["attack", "kv-inversion", "1 2 3 4 5 6 7 8", "--model", "tiny-gpt2",
                              "--scheme", "tlg", "-n", "2"])
    assert res.exit_code == 0, res.output
    assert "sorted" in res.output and "100.0%" in res.output
    for scheme, why in (("shielded", "no untrusted device"), ("soter", "stays in the enclave")):
        res = runner.invoke(app, ["attack", "kv-inversion", "1 2 3", "--model", "tiny-gpt2",
                                  "--scheme", scheme, "-n", "2"])
        assert res.exit_code == 2 and why in res.output
