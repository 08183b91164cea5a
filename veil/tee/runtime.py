"""Assembling a TEE-split model: protect the weights, start the device, hand the enclave its Ops.

In-process mode (this module's `start_*` functions): the device is served from a thread over a
socketpair — the same framing, counting and view recording as a separate device process.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.backends.plain import TorchOps
from veil.errors import ConfigError
from veil.model.config import ModelConfig
from veil.model.forward import forward
from veil.model.weights import Weights
from veil.ops import Step
from veil.tee.device import DeviceState, View, serve_in_thread
from veil.tee.enclave import EnclaveOps, HeadPermutation
from veil.tee.schemes.loro import (FactorBank, LoroConfig, LoroProtocol, PadPool, input_groups,
                                   make_factors, masked_weights, secret_generator)


def enclave_parameters(cfg: ModelConfig, weights: Weights) -> dict[str, torch.Tensor]:
    """Small parameters the enclave keeps in the clear: norm weights and biases."""
    return {k: v for k, v in weights.items() if "norm" in k or k.endswith(".bias")}


class _InputScale(TorchOps):
    """Plain execution that records the largest row RMS entering each linear group."""

    def __init__(self, cfg: ModelConfig, weights: Weights) -> None:
        super().__init__(cfg, weights)
        self.group_of = {n: g for g, names in input_groups(cfg).items() for n in names}
        self.rms: dict[str, float] = {}

    def _record(self, x: torch.Tensor, name: str) -> None:
        g = self.group_of[name]
        self.rms[g] = max(self.rms.get(g, 0.0), float(x.pow(2).mean().sqrt()))

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        self._record(x, name)
        return super().linear(x, name)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        self._record(x, "embed" if self.cfg.tie_embeddings else "lm_head")
        return super().lm_head(x)


def calibrate_pad_scale(cfg: ModelConfig, weights: Weights, ratio: float,
                        tokens: int = 32) -> dict[str, float]:
    """Pad σ per input group: `ratio` × the largest activation-row RMS seen on random tokens."""
    gen = secret_generator()
    ids = torch.randint(0, cfg.vocab_size, (2, min(tokens, cfg.max_seq_len)), generator=gen)
    rec = _InputScale(cfg, weights)
    with torch.inference_mode():
        forward(cfg, rec, ids, Step(torch.arange(ids.shape[1]).expand_as(ids), None, 0),
                rec.new_cache(*ids.shape))
    return {g: ratio * rec.rms[g] for g in input_groups(cfg)}


class TeeModelOps(EnclaveOps):
    """The enclave Ops plus what the harness may ask of the run: the device view and costs."""

    def __init__(self, *args: Any, device_state: DeviceState, bank: FactorBank | None = None,
                 pool: PadPool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device_state, self.bank, self.pool = device_state, bank, pool

    def device_view(self) -> View:
        return self.device_state.view()

    def resident_secret_bytes(self) -> int:
        perms = sum(t.nbytes for p in self.perms for t in p.tensors(0).values())
        local = sum(t.nbytes for t in self.w.values())
        return perms + local + (self.bank.nbytes() if self.bank is not None else 0)


def start_loro(cfg: ModelConfig, weights: Weights, options: dict[str, Any]) -> TeeModelOps:
    record = bool(options.pop("record_view", False))
    try:
        lcfg = LoroConfig(**options)
    except TypeError as exc:
        raise ConfigError(f"loro: {exc}") from None
    gen = secret_generator()
    sigma = calibrate_pad_scale(cfg, weights, lcfg.pad_ratio)
    bank = make_factors(cfg, weights, lcfg, gen)
    device_weights = masked_weights(cfg, weights, bank)
    local = enclave_parameters(cfg, weights)
    perms = [HeadPermutation.sample(cfg) for _ in range(cfg.n_layers)]
    state = DeviceState(record=record)
    state.tensors.update(device_weights)
    channel, _ = serve_in_thread(state)
    pool = PadPool(input_groups(cfg), sigma, lcfg.pads, lambda n: device_weights[f"{n}.weight"])
    biases = {k: v for k, v in local.items() if k.endswith(".bias") and "norm" not in k}
    protocol = LoroProtocol(cfg, bank, biases, pool)
    return TeeModelOps(cfg, local, protocol, perms, channel, "loro", device_state=state,
                       bank=bank, pool=pool)
