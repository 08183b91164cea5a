"""The device process's ops give what plain gives, over the real framing, and record its view."""

from __future__ import annotations

import pytest
import torch

from veil.backends.plain import TorchOps
from veil.errors import ProtocolAbort
from veil.model.config import PRESETS
from veil.model.zoo import random_weights
from veil.model.ops import Step
from veil.tee.device import DeviceState, serve_in_thread
from veil.tee.wire import Message


@pytest.fixture()
def tiny():
    cfg = PRESETS["tiny-llama"]
    return cfg, random_weights(cfg)


def test_linear_and_attention_match_plain(tiny):
    cfg, w = tiny
    state = DeviceState(record=True)
    ch, _ = serve_in_thread(state, timeout_s=5)
    names = ["layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v"]
    ch.call("put", [w[f"{n}.weight"] for n in names], names=[f"{n}.weight" for n in names])
    ch.call("cache", layers=1, batch=1, capacity=8, kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)
    plain = TorchOps(cfg, w)
    cache = plain.new_cache(1, 8)
    x = torch.randn(1, 5, cfg.d_model)
    q, k, v = ch.call("linear", [x], names=names).tensors
    for got, n in zip((q, k, v), names):
        assert torch.allclose(got, plain.linear(x, n), atol=1e-6)
    step = Step(torch.arange(5)[None], None, 0)
    want = plain.attention(0, q, k, v, step, cache)
    got = ch.call("attention", [q, k, v], layer=0, start=0, n_heads=cfg.n_heads,
                  head_dim=cfg.head_dim).tensors[0]
    assert torch.allclose(got, want, atol=1e-6)
    # one decode step appends to the device's cache
    x1 = torch.randn(1, 1, cfg.d_model)
    q1, k1, v1 = ch.call("linear", [x1], names=names).tensors
    want1 = plain.attention(0, q1, k1, v1, Step(torch.tensor([[5]]), None, 5), cache)
    got1 = ch.call("attention", [q1, k1, v1], layer=0, start=5, n_heads=cfg.n_heads,
                   head_dim=cfg.head_dim).tensors[0]
    assert torch.allclose(got1, want1, atol=1e-6)
    view = state.view()
    assert set(view.resident) >= {f"{n}.weight" for n in names} | {"kv_cache.k", "kv_cache.v"}
    assert any(torch.equal(t, x) for _, t in view.received)
    assert ch.stats.round_trips == 6


def test_bad_request_is_reported_and_ends_the_session(tiny):
    ch, thread = serve_in_thread(DeviceState(), timeout_s=5)
    with pytest.raises(ProtocolAbort, match="device reported: linear: no tensor 'nope.weight'"):
        ch.call("linear", [torch.ones(1, 4)], names=["nope"])
    thread.join(timeout=5)
    assert not thread.is_alive()
    with pytest.raises(ProtocolAbort):
        ch.call("linear", [torch.ones(1, 4)], names=["nope"])


def test_unknown_op_and_attention_without_cache():
    state = DeviceState()
    with pytest.raises(ProtocolAbort, match="unknown op"):
        state.handle(Message("frobnicate"))
    with pytest.raises(ProtocolAbort, match="before a cache"):
        state.handle(Message("attention", {"layer": 0}, [torch.ones(1)] * 3))
