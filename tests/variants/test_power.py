"""Power-Softmax as model variants: power attention against a direct float64 evaluation of its
formula (GQA, left padding, both normalisations, decode over the cache), the polynomial activation
and norm, the config's checks, the native folder, the fits and the range loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import veil
from veil.backends.plain import TorchOps
from veil.errors import ConfigError, UnsupportedError
from veil.model import native, zoo
from veil.model.config import PRESETS
from veil.model.forward import forward
from veil.model.ops import Step
from veil.model.weights import expected_shapes
from veil.variants.power import (RangeOps, activation_poly, calibrate_scores, convert_weights,
                                 fit_poly, goldschmidt_iterations, inv_sqrt_poly, max_error,
                                 range_stats, variant_config)

GQA = PRESETS["tiny-power"].with_(d_model=32, n_heads=4, n_kv_heads=2)   # head_dim 8, groups of 2


def direct(cfg, q, k, v, allowed):
    """The formula, float64, one query row at a time: q (B, T, nh, hd); k, v (B, S, nkv, hd);
    allowed (B, T, S)."""
    B, T, nh, hd = q.shape
    G = nh // cfg.n_kv_heads
    out = torch.zeros(B, T, nh, hd, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            keys = allowed[b, t].nonzero().flatten()
            L = len(keys)
            for h in range(nh):
                s = (k[b, keys, h // G] @ q[b, t, h]) / math.sqrt(hd)
                num = s ** cfg.power_p
                eps = cfg.power_eps * (L if cfg.power_length_agnostic else 1)
                out[b, t, h] = (num / (eps + num.sum())) @ v[b, keys, h // G]
    return out


def _qkv(cfg, B, S, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(B, S, cfg.n_heads, cfg.head_dim, generator=g, dtype=torch.float64)
    k = scale * torch.randn(B, S, cfg.n_kv_heads, cfg.head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(B, S, cfg.n_kv_heads, cfg.head_dim, generator=g, dtype=torch.float64)
    return q, k, v


def _attend(ops, cfg, q, k, v, step, cache):
    B, T = q.shape[:2]
    out = ops.attention(0, q.reshape(B, T, -1).float(), k.reshape(B, T, -1).float(),
                        v.reshape(B, T, -1).float(), step, cache)
    return out.view(B, T, cfg.n_heads, cfg.head_dim).double()


@pytest.mark.parametrize("agnostic", [True, False])
@pytest.mark.parametrize("cfg", [PRESETS["tiny-power"], GQA], ids=["mha", "gqa"])
def test_power_attention_is_the_formula_in_prefill_and_decode(cfg, agnostic):
    """Left-padded batch (row 1 has 3 pad slots): prefill of 6 tokens, then 4 single-token decode
    steps over the cache; every output equals the direct evaluation (a padded query sees itself)."""
    cfg = cfg.with_(power_length_agnostic=agnostic, power_eps=0.5)
    ops = TorchOps(cfg, zoo.random_weights(cfg))
    B, S, pad = 2, 10, 3
    q, k, v = _qkv(cfg, B, S)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :pad] = False
    slot = torch.arange(S)
    allowed = (slot[None, :] <= slot[:, None])[None] & valid[:, None, :]
    allowed = allowed | torch.eye(S, dtype=torch.bool)[None]
    ref = direct(cfg, q, k, v, allowed)
    positions = (slot[None, :] - torch.tensor([0, pad])[:, None]).clamp(min=0)
    cache = ops.new_cache(B, S)
    got = [_attend(ops, cfg, q[:, :6], k[:, :6], v[:, :6], Step(positions[:, :6], valid, 0),
                   cache)]
    for t in range(6, S):
        got.append(_attend(ops, cfg, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1],
                           Step(positions[:, t:t + 1], valid, t), cache))
    got = torch.cat(got, 1)
    assert float((got - ref).abs().max()) < 1e-5 * float(ref.abs().max()) + 1e-6


def test_power_attention_unpadded_prefill_is_causal():
    cfg = GQA
    ops = TorchOps(cfg, zoo.random_weights(cfg))
    q, k, v = _qkv(cfg, 2, 7, seed=1)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()[None].expand(2, 7, 7)
    got = _attend(ops, cfg, q, k, v, Step(torch.arange(7).expand(2, 7), None, 0),
                  ops.new_cache(2, 7))
    ref = direct(cfg, q, k, v, allowed)
    assert float((got - ref).abs().max()) < 1e-5 * float(ref.abs().max()) + 1e-6


def test_power_attention_is_stable_for_huge_and_zero_scores():
    """The stable form: scores of 1e6 (s^4 = 1e24 overflows nothing once scaled) and an all-zero
    query row (weights 0, not NaN)."""
    cfg = PRESETS["tiny-power"]
    ops = TorchOps(cfg, zoo.random_weights(cfg))
    q, k, v = _qkv(cfg, 1, 5, scale=1e3)
    q[0, 2] = 0
    out = _attend(ops, cfg, q, k, v, Step(torch.arange(5)[None], None, 0), ops.new_cache(1, 5))
    assert torch.isfinite(out).all()
    assert float(out[0, 2].abs().max()) == 0.0


def _spread(cfg, seed=0):
    """Random weights with q/k large enough that attention is far from uniform."""
    w = zoo.random_weights(cfg, seed)
    return {n: t * 25 if ".attn.q." in n or ".attn.k." in n else t for n, t in w.items()}


@pytest.mark.parametrize("cfg", [PRESETS["tiny-power"], GQA], ids=["mha", "gqa"])
def test_model_decodes_like_the_full_forward(cfg):
    ops = TorchOps(cfg, _spread(cfg))
    seq = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    full = forward(cfg, ops, seq, Step(torch.arange(12)[None], None, 0), ops.new_cache(1, 12))[0]
    cache = ops.new_cache(1, 12)
    out = [forward(cfg, ops, seq[:, :8], Step(torch.arange(8)[None], None, 0), cache)[0]]
    for t in range(8, 12):
        out.append(forward(cfg, ops, seq[:, t:t + 1], Step(torch.tensor([[t]]), None, t),
                           cache)[0])
    assert float((torch.cat(out) - full).abs().max()) < 1e-4


def test_padded_batch_generates_like_single_prompts(tmp_path):
    cfg = GQA
    folder = native.save_native(tmp_path / "m", cfg, _spread(cfg, 1))
    prompts = [[1, 5, 9], [7, 8, 9, 10, 11, 12]]
    with veil.load(folder) as m:
        batch = [g.token_ids for g in m.generate(prompts, max_new_tokens=6, ignore_eos=True)]
        single = [m.generate(p, max_new_tokens=6, ignore_eos=True).token_ids for p in prompts]
        assert batch == single
        assert torch.isfinite(m.logits([prompts[1]])).all()


def test_tiny_power_preset_loads_and_is_finite():
    with veil.load("tiny-power") as m:
        cfg = m.cfg
        assert (cfg.attention, cfg.activation, cfg.norm, cfg.mlp) == ("power", "poly", "affine",
                                                                      "plain")
        assert cfg.score_bound == 2.0 and cfg.power_eps == 4.0 and cfg.power_p == 4
        assert torch.isfinite(m.logits([[1, 2, 3, 4, 5, 6]])).all()
    assert goldschmidt_iterations(cfg.power_eps, cfg.score_bound, cfg.power_p) == 5


def test_poly_activation_and_norm_formulas():
    cfg = PRESETS["tiny-power"].with_(norm="poly", norm_poly=(1.9, -1.2, 0.4, -0.04),
                                      norm_lo=0.25, norm_hi=4.0, poly=(0.1, -0.5, 0.25, 0.05))
    w = zoo.random_weights(cfg)
    ops = TorchOps(cfg, w)
    x = torch.randn(2, 3, cfg.d_model, dtype=torch.float64).float()
    xd = x.double()
    act = sum(c * xd ** i for i, c in enumerate(cfg.poly))
    assert torch.allclose(ops.activation(x).double(), act, atol=1e-5)
    u = xd.pow(2).mean(-1, keepdim=True)
    q = sum(c * u ** i for i, c in enumerate(cfg.norm_poly))
    ref = xd * q * w["final_norm.weight"].double()
    assert torch.allclose(ops.norm(x, "final_norm").double(), ref, atol=1e-5)
    assert "final_norm.bias" not in expected_shapes(cfg)


@pytest.mark.parametrize("knobs, match", [
    ({"power_p": 3}, "power_p"), ({"power_p": 0}, "power_p"), ({"power_p": True}, "power_p"),
    ({"power_p": 4.0}, "power_p"), ({"power_eps": 0.0}, "power_eps"),
    ({"power_delta": -1.0}, "power_delta"), ({"score_bound": -2.0}, "score_bound"),
    ({"score_bound": float("inf")}, "score_bound"), ({"act_bound": -1.0}, "act_bound"),
    ({"poly": ()}, "poly"), ({"poly": (1.0, float("nan"))}, "poly"),
    ({"poly": ("a",)}, "poly"), ({"power_length_agnostic": 1}, "power_length_agnostic"),
    ({"norm": "poly"}, "norm_poly"),
    ({"norm": "poly", "norm_poly": (1.0,), "norm_lo": 2.0, "norm_hi": 1.0}, "norm_lo"),
    ({"norm": "poly", "norm_poly": (1.0,), "norm_lo": 0.0, "norm_hi": 1.0}, "norm_lo"),
])
def test_config_checks_name_the_knob(knobs, match):
    with pytest.raises(ConfigError, match=match):
        PRESETS["tiny-power"].with_(**knobs)


def test_unknown_attention_is_unsupported():
    with pytest.raises(UnsupportedError, match="attention"):
        PRESETS["tiny-power"].with_(attention="powr")


def test_native_round_trip(tmp_path):
    cfg = GQA.with_(norm="poly", norm_poly=(1.9, -1.2, 0.4), norm_lo=0.25, norm_hi=4.0,
                    power_length_agnostic=False, power_delta=1e-2)
    w = zoo.random_weights(cfg)
    assert cfg.n_params() == sum(t.numel() for t in w.values())
    native.save_native(tmp_path / "m", cfg, w)
    back, bw = native.load_native(tmp_path / "m")
    assert back == cfg and isinstance(back.poly, tuple) and isinstance(back.norm_poly, tuple)
    assert all(torch.equal(bw[k], w[k]) for k in w)


def test_fits_and_their_errors():
    cubic = (0.5, -1.0, 0.25, 2.0)
    got = fit_poly(lambda x: np.polynomial.polynomial.polyval(x, cubic), -3, 3, 3)
    assert np.allclose(got, cubic, atol=1e-8)
    silu = activation_poly("silu", 4.0, 2)
    assert abs(silu[1] - 0.5) < 1e-9          # SiLU's odd part is x/2: the fit keeps it exactly
    assert max_error(silu, lambda x: x / (1 + np.exp(-x)), -4, 4) < 0.24
    # a cubic fit of SiLU is its quadratic (the cubic coefficient vanishes)
    assert abs(activation_poly("silu", 4.0, 3)[3]) < 1e-9
    inv = inv_sqrt_poly(0.5, 2.0, 3)
    assert max_error(inv, lambda u: u ** -0.5, 0.5, 2.0, relative=True) < 0.02
    with pytest.raises(ConfigError, match="lo < hi"):
        fit_poly(np.sin, 1.0, 1.0, 2)
    with pytest.raises(ConfigError, match="degree"):
        fit_poly(np.sin, 0.0, 1.0, -1)
    with pytest.raises(ConfigError, match="0 < lo"):
        inv_sqrt_poly(0.0, 1.0, 2)
    with pytest.raises(ConfigError, match="activation"):
        activation_poly("quad", 4.0, 2)


def test_variant_config_and_conversion():
    base = PRESETS["tiny-llama"]
    cfg = variant_config(base, norm="poly")
    assert (cfg.attention, cfg.activation, cfg.norm) == ("power", "poly", "poly")
    assert cfg.score_bound > 0 and cfg.act_bound > 0 and len(cfg.poly) == 3
    assert goldschmidt_iterations(cfg.power_eps, cfg.score_bound, cfg.power_p) <= 5
    w = convert_weights(base, zoo.random_weights(base), cfg)
    gpt2 = PRESETS["tiny-gpt2"]
    assert not any(k.endswith("norm.bias") for k in
                   convert_weights(gpt2, zoo.random_weights(gpt2),
                                   variant_config(gpt2, norm="poly")))
    with pytest.raises(ConfigError, match="softmax"):
        variant_config(cfg)
    # calibration puts the chosen quantile of |s| on the bound
    w = _spread(cfg)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cal = calibrate_scores(cfg, w, [ids], quantile=1.0, rounds=3)
    peak = max(range_stats(cfg, cal, ids).score_peak.values())
    assert abs(peak - cfg.score_bound) < 0.2 * cfg.score_bound


def test_range_loss_is_zero_inside_and_positive_outside():
    cfg = variant_config(PRESETS["tiny-llama"], norm="poly", norm_range=(1e-5, 100.0))
    w = zoo.random_weights(cfg)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    inside = range_stats(cfg, w, ids)
    assert float(inside.loss()) == 0.0
    assert set(inside.fractions()) == {"scores", "rows", "act", "norm"}
    assert all(v == 0.0 for v in inside.fractions().values())
    assert 0 < max(inside.z_peak.values()) <= 1          # HE's Goldschmidt input stays in (0, 1]
    for grow, factor, kind in (({".attn.q.", ".attn.k."}, 1e4, "scores"),
                               ({".mlp.gate."}, 1e3, "act"), ({"embed.weight"}, 1e-2, "norm")):
        big = {n: t * factor if any(g in n for g in grow) else t.clone().requires_grad_(True)
               for n, t in w.items()}
        ops = RangeOps(cfg, big)
        forward(cfg, ops, ids, Step(torch.arange(12).expand(2, 12), None, 0), ops.new_cache(2, 12))
        assert ops.stats.fractions()[kind] > 0, kind
        if kind == "scores":                # the row denominators too, and z leaves (0, 1]
            assert ops.stats.fractions()["rows"] > 0 and max(ops.stats.z_peak.values()) > 1
        loss = ops.stats.loss()
        assert float(loss.detach()) > 0, kind
        loss.backward()                     # differentiable: gradients reach the weights
        assert any(t.grad is not None and float(t.grad.abs().sum()) > 0
                   for t in big.values() if t.requires_grad)
