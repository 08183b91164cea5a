"""KV-cache inversion: every attack against the view it reads, with measured rates — the plain
cache, LoRO's/TLG's head mixings and KV-Shield's modes that fall, and the mode that resists."""

from __future__ import annotations

import pytest
import torch

import veil
from conftest import FAMILIES
from veil.attacks.kv_inversion import (DEVICE, SNAPSHOT, Vocabulary, attack_view, invert_values,
                                       record, recovery_rate)


def _rates(model: str, scheme: str, ids: list[int], which: str = SNAPSHOT, known: int = 0,
           n: int = 4, **options) -> dict[str, float]:
    with veil.load(model) as m:
        vocab = Vocabulary(m.cfg, m.ops.w)
    seen, tokens = record(model, scheme, ids, n, **options)
    return {r.attack: r.recovered for r in attack_view(vocab, seen, tokens, which, known)}


def _ids(model: str, n: int, seed: int) -> list[int]:
    with veil.load(model) as m:
        return torch.randint(0, m.cfg.vocab_size, (n,),
                             generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("preset", FAMILIES)
def test_a_plain_cache_gives_the_conversation_back(preset):
    ids = _ids(preset, 40, 1) + [7, 7, 7]       # repeats: every occurrence is read off on its own
    with veil.load(preset) as m:
        seen, tokens = record(preset, "plain", ids, 1)                # one token: no decode slot
        assert tokens == ids
        got = invert_values(Vocabulary(m.cfg, m.ops.w), seen.resident["kv_cache.v"][0, 0],
                            list(range(len(ids))))
        assert recovery_rate(got, ids) >= 0.99


@pytest.mark.default_model
def test_a_plain_cache_of_the_default_model_gives_the_conversation_back(default_model):
    ids = default_model.encode("My doctor said the biopsy results came back positive.", chat=True)
    assert _rates("default", "plain", ids, n=1)["nearest"] >= 0.99


# (scheme, options, the attack that breaks it): every mode an attack in the repo breaks, broken
BROKEN = [
    ("loro", {}, "norms"),                                   # Haar rotations keep each head's norm
    ("loro", {"attention_mixing": "permute"}, "sorted"),
    ("tlg", {}, "sorted"),
    ("kvshield", {"mixing": "permute"}, "sorted"),           # the paper's RPM
    ("kvshield", {"mixing": "rotate"}, "norms"),
    ("kvshield", {"mixing": "permute", "fold": True}, "folded"),
    ("kvshield", {"mixing": "rotate", "fold": True}, "folded"),
]


@pytest.mark.parametrize("scheme, options, attack", BROKEN,
                         ids=[f"{s}-{a}-{'-'.join(map(str, o.values()))}" for s, o, a in BROKEN])
def test_transformed_caches_that_fall(scheme, options, attack):
    """The plain attack reads (almost) nothing from the device's cache; the named attack reads
    every token back from a snapshot."""
    rates = _rates("tiny-llama", scheme, _ids("tiny-llama", 30, 3), **options)
    assert rates["nearest"] < 0.2
    assert rates[attack] >= 0.99


def test_padded_kvshield_resists_every_snapshot_attack_on_a_tiny_model():
    """kvshield's default (K/V padded with noise at 4× the layer's rms, then rotated): with 8
    known tokens, no attack in the repo reads a fifth of the rest from a snapshot (measured on
    the default model: docs/kvshield.md); at pad_scale 1 the known tokens' inner products read
    most of it."""
    ids = _ids("tiny-llama", 40, 5)
    strong = _rates("tiny-llama", "kvshield", ids, known=8)
    assert set(strong) >= {"nearest", "sorted", "norms", "gram", "pca", "procrustes(gram)"}
    assert max(strong.values()) < 0.2, strong
    weak = _rates("tiny-llama", "kvshield", ids, known=8, pad_scale=1.0)
    assert max(weak["gram"], weak["procrustes(gram)"]) > 0.5, weak


def test_the_device_view_gives_kvshield_away():
    """What the device received: layer 0's inputs in the clear (kvshield), or permuted (tlg)."""
    ids = _ids("tiny-llama", 30, 4)
    assert _rates("tiny-llama", "kvshield", ids, DEVICE)["inputs"] >= 0.99
    assert _rates("tiny-llama", "tlg", ids, DEVICE)["inputs-sorted"] >= 0.99
    # padded inputs: a few hits by chance in d = 64 (measured over 30 draws of 33 tokens: mean
    # 3.5%, one draw in ~50 above 0.2), so the rate is taken over more tokens
    loro = _rates("tiny-llama", "loro", _ids("tiny-llama", 30, 12), DEVICE)
    assert max(loro["inputs"], loro["inputs-sorted"]) < 0.2


@pytest.mark.default_model
@pytest.mark.parametrize("scheme, options, attack", [("loro", {}, "norms"),
                                                     ("kvshield", {"mixing": "permute"}, "sorted")])
def test_default_model_chat_falls_from_the_snapshot(default_model, scheme, options, attack):
    """The figures `veil explain` and docs state: every token of a chat conversation read back
    from the device's cache."""
    ids = default_model.encode("My doctor said the biopsy results came back positive.", chat=True)
    assert _rates("default", scheme, ids, **options)[attack] >= 0.99


def test_the_cli_reports_each_attack_and_refuses_schemes_without_a_device_cache():
    from typer.testing import CliRunner

    from veil.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["attack", "kv-inversion", "1 2 3 4 5 6 7 8", "--model", "tiny-gpt2",
                              "--scheme", "tlg", "-n", "2", "--known", "0"])
    assert res.exit_code == 0, res.output
    assert "sorted" in res.output and "100.0%" in res.output
    res = runner.invoke(app, ["attack", "kv-inversion", "1 2 3 4 5 6", "--model", "tiny-gpt2",
                              "--scheme", "nnsplitter", "-n", "2", "--view", "device"])
    assert res.exit_code == 0 and "inputs" in res.output, res.output
    for scheme, why in (("shielded", "no untrusted device"), ("soter", "stays in the enclave")):
        res = runner.invoke(app, ["attack", "kv-inversion", "1 2 3", "--model", "tiny-gpt2",
                                  "--scheme", scheme, "-n", "2"])
        assert res.exit_code == 2 and why in res.output


@pytest.mark.parametrize("preset", FAMILIES)
def test_plain_keys_give_the_conversation_back_with_rope_undone(preset):
    ids = _ids(preset, 30, 2)
    assert _rates(preset, "plain", ids, n=1)["nearest-keys"] >= 0.99


def test_a_reused_pad_gives_the_prompt_back_from_one_known_token():
    """LoRO with `pads="fixed"` (the public code's mode): one known token's row gives the shared
    pad, and every other layer-0 input row comes back unpadded — the whole prompt. Fresh pads
    (veil's default) leave the same attack with nothing."""
    import torch

    from veil.attacks.kv_inversion import DEVICE, Recorder, Vocabulary, attack_view
    from veil.model.opening import open_model

    o = open_model("tiny-llama")
    vocab = Vocabulary(o.cfg, o.weights)
    ids = torch.randint(0, o.cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    rates = {}
    for pads in ("fixed", "fresh"):
        rec = Recorder("tiny-llama", "loro", pads=pads)
        try:
            got = {r.attack: r.recovered for r in attack_view(vocab, rec.view(ids), ids, DEVICE, 1)}
        finally:
            rec.close()
        rates[pads] = got["inputs-fixed-pad"]
    assert rates["fixed"] == 1.0
    assert rates["fresh"] < 0.2
