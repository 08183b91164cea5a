"""Assembling a TEE-split model: protect the weights, start the device, hand the enclave its Ops.

In-process mode (this module's `start_*` functions): the device is served from a thread over a
socketpair — the same framing, counting and view recording as a separate device process.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.backends.recording import RecordingOps
from veil.errors import ConfigError
from veil.model.forward import forward
from veil.ops import Step
from veil.model.config import ModelConfig
from veil.model.weights import Weights
from veil.tee.device import DeviceState, View, serve_in_thread
from veil.tee.enclave import EnclaveOps, HeadMixing
from veil.tee.integrity import Freivalds
from veil.tee.schemes.loro import (FactorBank, LoroConfig, LoroProtocol, PadPool, input_groups,
                                   make_factors, masked_weights, secret_generator)


def enclave_parameters(cfg: ModelConfig, weights: Weights) -> dict[str, torch.Tensor]:
    """Small parameters the enclave keeps in the clear: norm weights and biases."""
    return {k: v for k, v in weights.items() if "norm" in k or k.endswith(".bias")}


def attention_calibration(cfg: ModelConfig, weights: Weights,
                          tokens: int = 32) -> list[dict[str, torch.Tensor]]:
    """True q, k, v rows per layer on random tokens (what `HeadMixing.sample` decorrelates from)."""
    gen = secret_generator()
    ids = torch.randint(0, cfg.vocab_size, (2, min(tokens, cfg.max_seq_len)), generator=gen)
    rec = RecordingOps(cfg, weights)
    with torch.inference_mode():
        forward(cfg, rec, ids, Step(torch.arange(ids.shape[1]).expand_as(ids), None, 0),
                rec.new_cache(*ids.shape))
    found = dict(rec.records)
    return [{x: found[f"attn{i}.{x}"] for x in "qkv"} for i in range(cfg.n_layers)]


class TeeModelOps(EnclaveOps):
    """The enclave Ops plus what the harness may ask of the run: the device view and costs."""

    def __init__(self, *args: Any, device_state: DeviceState, bank: FactorBank | None = None,
                 pool: PadPool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device_state, self.bank, self.pool = device_state, bank, pool

    def device_view(self) -> View:
        return self.device_state.view()

    def resident_secret_bytes(self) -> int:
        perms = sum(p.nbytes() for p in self.perms)
        local = sum(t.nbytes for t in self.w.values())
        checks = self.verifier.nbytes() if self.verifier is not None else 0
        return perms + local + checks + (self.bank.nbytes() if self.bank is not None else 0)


def start_loro(cfg: ModelConfig, weights: Weights, options: dict[str, Any]) -> TeeModelOps:
    record = bool(options.pop("record_view", False))
    verify = bool(options.pop("verify", False))
    mixing = options.pop("attention_mixing", "rotate")
    if mixing not in ("rotate", "permute"):
        raise ConfigError(f"loro: attention_mixing must be 'rotate' or 'permute', got {mixing!r}")
    try:
        lcfg = LoroConfig(**options)
    except TypeError as exc:
        raise ConfigError(f"loro: {exc}") from None
    gen = secret_generator()
    bank = make_factors(cfg, weights, lcfg, gen)
    device_weights = masked_weights(cfg, weights, bank)
    local = enclave_parameters(cfg, weights)
    calib = attention_calibration(cfg, weights)
    perms = [HeadMixing.sample(cfg, mixing, calib[i]) for i in range(cfg.n_layers)]
    state = DeviceState(record=record)
    state.tensors.update(device_weights)
    channel, _ = serve_in_thread(state)
    pool = PadPool(input_groups(cfg), lcfg.pads, lambda n: device_weights[f"{n}.weight"])
    biases = {k: v for k, v in local.items() if k.endswith(".bias") and "norm" not in k}
    protocol = LoroProtocol(cfg, bank, biases, pool, lcfg.pad_ratio)
    verifier = None
    if verify:
        tables = ["embed"] + (["pos_embed"] if cfg.position == "learned" else [])
        verifier = Freivalds({n.removesuffix(".weight"): w for n, w in device_weights.items()},
                             {n: device_weights[f"{n}.weight"] for n in tables}, gen)
    return TeeModelOps(cfg, local, protocol, perms, channel, "loro", verifier=verifier,
                       device_state=state, bank=bank, pool=pool)
