"""kvshield: exact for every mixing (tiny families and the default model), fresh transforms per
conversation, the ids kept in the enclave, folded weights, options checked."""

from __future__ import annotations

import pytest
import torch

import veil
from conftest import assert_logits_close
from veil.backends.plain import TorchOps
from veil.csprng import SecretRng
from veil.errors import ConfigError
from veil.model import zoo
from veil.model.forward import forward
from veil.model.ops import Step
from veil.schemes import get
from veil.tee.mixing import HeadMixing, _rope_commuting

MODES = ({"mixing": "permute"}, {"mixing": "rotate"}, {"mixing": "padded"},
         {"mixing": "padded", "pad_width": 3}, {"mixing": "permute", "fold": True},
         {"mixing": "rotate", "fold": True})
IDS = [1, 5, 9, 20, 33, 7, 2, 8]


def _label(o: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in o.items())


@pytest.mark.parametrize("opts", MODES, ids=_label)
def test_exact_on_tiny_families(tiny_hf, opts):
    """Logits within the scheme's tiny tolerance and plain's greedy tokens, for two conversations
    in a row (the second under freshly drawn transforms)."""
    _, folder, _ = tiny_hf
    with veil.load(folder) as ref, veil.load(folder, scheme="kvshield", **opts) as m:
        assert_logits_close(m.logits([IDS]), ref.logits([IDS]), get("kvshield").tolerance.tiny)
        want = ref.generate(IDS, max_new_tokens=8, ignore_eos=True).token_ids
        for _ in range(2):
            assert m.generate(IDS, max_new_tokens=8, ignore_eos=True).token_ids == want


@pytest.mark.default_model
@pytest.mark.parametrize("opts", MODES[:3] + MODES[4:], ids=_label)
def test_exact_on_default_model(default_model, opts):
    ids = default_model.encode("The quick brown fox jumps over the lazy dog because")
    with veil.load("default", scheme="kvshield", **opts) as m:
        assert_logits_close(m.logits([ids]), default_model.logits([ids]),
                            get("kvshield").tolerance.default)
        assert m.generate(ids, max_new_tokens=24).token_ids == \
            default_model.generate(ids, max_new_tokens=24).token_ids


def test_fresh_transforms_per_conversation():
    """The same prompt twice: the second cache holds other values (new transforms, new pads),
    and the folded weights the device holds change too."""
    for opts in ({"mixing": "rotate"}, {"mixing": "padded"}, {"mixing": "permute", "fold": True}):
        with veil.load("tiny-llama", scheme="kvshield", record_view=True, **opts) as m:
            m.generate(IDS, max_new_tokens=2, ignore_eos=True)
            first = {k: v.clone() for k, v in m.device_view().resident.items()}
            assert m.ops.fresh.draws == 1
            m.generate(IDS, max_new_tokens=2, ignore_eos=True)
            second = m.device_view().resident
            assert m.ops.fresh.draws == 2
            n = len(IDS)
            assert not torch.allclose(first["kv_cache.k"][..., :n, :], second["kv_cache.k"][..., :n, :])
            if opts.get("fold"):
                assert not torch.equal(first["layers.0.attn.q.weight"],
                                       second["layers.0.attn.q.weight"])


def test_ids_stay_in_the_enclave():
    """No embedding lookup crosses, and the device holds no embedding table for lookups of its own
    beyond the (public) LM head; the cache is not the plain one."""
    with veil.load("tiny-gpt2", scheme="kvshield", record_view=True) as m, \
            veil.load("tiny-gpt2") as ref:
        m.generate(IDS, max_new_tokens=3, ignore_eos=True)
        v = m.device_view()
        assert not [n for n, _ in v.received if n.startswith("rows")]
        assert "pos_embed.weight" not in v.resident
        assert all(t.dtype != torch.int64 for _, t in v.received)
        cache = ref.ops.new_cache(1, 16)        # the plain cache of the same tokens, for contrast
        with torch.inference_mode():
            forward(ref.cfg, ref.ops, torch.tensor([IDS]), Step(torch.arange(len(IDS))[None], None, 0),
                    cache)
        plain_v = cache.v[0, 0, :, :len(IDS)]
        dev_v = v.resident["kv_cache.v"][0, 0, :, :len(IDS)]
        assert dev_v.shape[-1] == 2 * plain_v.shape[-1]          # padded by the head dim
        assert not torch.allclose(dev_v[..., :plain_v.shape[-1]], plain_v, atol=1e-3)


def test_folded_weights_hide_nothing_from_the_public_model():
    """fold=true: the device's W_q differs from the public one by a per-head transform only —
    what attack 3 (W'·W⁺) reads back."""
    with veil.load("tiny-llama", scheme="kvshield", record_view=True, mixing="rotate",
                   fold=True) as m:
        m.generate(IDS, max_new_tokens=2, ignore_eos=True)
        w_dev = m.device_view().resident["layers.0.attn.v.weight"]
        with veil.load("tiny-llama") as ref:
            w = ref.ops.w["layers.0.attn.v.weight"]
        assert not torch.allclose(w_dev, w)
        hd = m.cfg.head_dim
        # each device slot's rows are an orthogonal transform of one true head's rows
        for j in range(m.cfg.n_kv_heads):
            rows = w_dev[j * hd:(j + 1) * hd]
            fits = []
            for g in range(m.cfg.n_kv_heads):
                t = rows @ torch.linalg.pinv(w[g * hd:(g + 1) * hd])
                fits.append(float((t @ t.T - torch.eye(hd)).abs().max()))
            assert min(fits) < 1e-3


def test_rope_commuting_transforms_commute_with_rope():
    cfg = zoo.preset("tiny-llama")
    ops = TorchOps(cfg, zoo.random_weights(cfg, 0))
    rng = SecretRng(bytes(32))
    hd = cfg.head_dim
    for kind in ("permute", "rotate"):
        m = _rope_commuting(hd, kind, rng)
        assert torch.allclose(m @ m.T, torch.eye(hd), atol=1e-6)
        q = torch.randn(1, 5, cfg.n_heads * hd)
        k = torch.randn(1, 5, cfg.n_kv_heads * hd)
        step = Step(torch.arange(3, 8)[None], None, 3)
        rq, rk = ops.rope(q, k, step)
        tq, tk = ops.rope((q.view(1, 5, -1, hd) @ m).view(1, 5, -1),
                          (k.view(1, 5, -1, hd) @ m).view(1, 5, -1), step)
        assert torch.allclose(tq, (rq.view(1, 5, -1, hd) @ m).view(1, 5, -1), atol=1e-5)
        assert torch.allclose(tk, (rk.view(1, 5, -1, hd) @ m).view(1, 5, -1), atol=1e-5)


def test_padded_mixing_changes_norms_and_keeps_scores():
    cfg = zoo.preset("tiny-llama")
    hd = cfg.head_dim
    mix = HeadMixing.sample(cfg, "padded", rng=SecretRng(bytes(32)), width=hd,
                            pad_scales=torch.tensor([1.0, 1.0]))
    q = torch.randn(1, 4, cfg.n_heads * hd)
    k = torch.randn(1, 4, cfg.n_kv_heads * hd)
    v = torch.randn(1, 4, cfg.n_kv_heads * hd)
    qd, kd, vd = mix.conceal(q, k, v, hd)
    D = 2 * hd
    assert kd.shape[-1] == cfg.n_kv_heads * D
    true_norms = k.view(4, -1, hd)[:, mix.k_heads].norm(dim=-1)
    assert not torch.allclose(kd.view(4, -1, D).norm(dim=-1), true_norms, rtol=0.05)
    # scores per head: unchanged
    G = cfg.n_heads // cfg.n_kv_heads
    s_dev = torch.einsum("tgd,sd->tgs", qd.view(4, -1, D)[:, :G], kd.view(4, -1, D)[:, 0])
    kh = k.view(4, -1, hd)[:, int(mix.k_heads[0])]
    s_true = torch.einsum("tgd,sd->tgs", q.view(4, -1, hd)[:, mix.q_heads[:G]], kh)
    assert torch.allclose(s_dev, s_true, atol=1e-4)


@pytest.mark.parametrize("opts, message", [
    ({"mixing": "padded", "fold": True}, "per-token pad cannot be folded"),
    ({"mixing": "rotate", "pad_width": 8}, "needs mixing='padded'"),
    ({"pad_width": 0}, "must be ≥ 1"),
    ({"mixing": "scramble"}, "mixing"),
])
def test_bad_options(opts, message):
    with pytest.raises(ConfigError, match=message):
        veil.load("tiny-llama", scheme="kvshield", **opts)


@pytest.mark.parametrize("scheme", ["loro", "tlg"])
def test_loro_and_tlg_draw_fresh_mixings_per_conversation(scheme):
    """fresh_mixing (default on): the same prompt twice leaves different caches on the device;
    off: the sealed mixings, the same cache both times. Tokens equal plain's either way."""
    with veil.load("tiny-llama") as ref:
        want = ref.generate(IDS, max_new_tokens=3, ignore_eos=True).token_ids
    for fresh in (True, False):
        with veil.load("tiny-llama", scheme=scheme, record_view=True, fresh_mixing=fresh) as m:
            caches = []
            for _ in range(2):
                assert m.generate(IDS, max_new_tokens=3, ignore_eos=True).token_ids == want
                caches.append(m.device_view().resident["kv_cache.v"][..., :len(IDS), :].clone())
            same = torch.allclose(caches[0], caches[1], atol=1e-3)
            assert same != fresh
            assert m.generate(IDS, max_new_tokens=1).cost.split.mixing_draws == int(fresh)


@pytest.mark.parametrize("opts, per_layer", [({"mixing": "permute", "fold": True}, 1), ({}, 2)],
                         ids=["fold", "padded"])
def test_round_trips_per_decode_step(opts, per_layer):
    """The device runs the public model's ops as programs: one round trip per layer when the
    transform is folded (the paper's dataflow), two when the enclave transforms q/k/v; plus the
    logits."""
    with veil.load("tiny-llama", scheme="kvshield", **opts) as m:
        one = m.generate(IDS, max_new_tokens=1, ignore_eos=True).cost.split
        two = m.generate(IDS, max_new_tokens=2, ignore_eos=True).cost.split
        assert two.round_trips - one.round_trips == per_layer * m.cfg.n_layers + 1


def test_bad_programs_are_refused():
    from veil.errors import ProtocolAbort
    from veil.model.config import hf_config_dict
    from veil.tee.device import DeviceState
    from veil.tee.wire import Message

    cfg = zoo.preset("tiny-llama")
    state = DeviceState()
    state.tensors.update(zoo.random_weights(cfg, 0))
    x = torch.randn(1, 2, cfg.d_model)
    norm = {"op": "norm", "in": [-1], "out": [0], "name": "final_norm"}
    with pytest.raises(ProtocolAbort, match="before configure"):
        state.handle(Message("program", {"steps": [norm], "outputs": [0]}, [x]))
    state.handle(Message("configure", {"config": hf_config_dict(cfg)}))
    got = state.handle(Message("program", {"steps": [norm], "outputs": [0]}, [x])).tensors[0]
    assert torch.allclose(got, TorchOps(cfg, state.tensors).norm(x, "final_norm"))
    for steps, why in (([{"op": "lm_head", "in": [-1], "out": [1]}], "not one the device runs"),
                       ([{"op": "add", "in": [7, -1], "out": [1]}], "no value 7"),
                       ([{"op": "add", "in": [-1, -3], "out": [1]}], "no input tensor 2")):
        with pytest.raises(ProtocolAbort, match=why):
            state.handle(Message("program", {"steps": steps, "outputs": []}, [x]))


def test_no_live_values_stay_on_the_device_between_forwards():
    """A snapshot between generations finds the cache, not the forward's hidden states."""
    with veil.load("tiny-llama", scheme="kvshield", record_view=True) as m:
        m.generate(IDS, max_new_tokens=3, ignore_eos=True)
        assert not [n for n in m.device_view().resident if n.startswith("value.")]
