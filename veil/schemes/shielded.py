"""`shielded`: the whole model inside the enclave (MLCapsule/DarkneTZ-style) — the untrusted device
holds and receives nothing. The slow, safe end of the TEE schemes: what LoRO is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from veil.backends.plain import TorchOps
from veil.model.opening import OpenedModel
from veil.tee.artifact import Opened
from veil.schemes.base import (EnclaveHolding, NoOptions, Placement, Protected, Scheme, StepSession,
                               Tolerance)


@dataclass
class ShieldedSecrets:
    """The enclave's whole model: what `veil protect --scheme shielded` seals."""

    weights: dict[str, torch.Tensor]

    def to_sealable(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {f"enclave.{k}": v for k, v in self.weights.items()}, {}

    @staticmethod
    def from_sealed(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "ShieldedSecrets":
        return ShieldedSecrets({k.removeprefix("enclave."): v for k, v in tensors.items()})


class ShieldedSession(StepSession, EnclaveHolding):
    """The enclave runs the torch executor on its own copy of the weights. A copy it unsealed is
    its own, and is wiped on close (weights handed in by `veil.load` belong to the caller)."""

    def __init__(self, cfg: Any, weights: dict[str, torch.Tensor], owned: bool) -> None:
        super().__init__("shielded", cfg, TorchOps(cfg, weights))
        self._owned = weights if owned else {}

    def resident_secret_bytes(self) -> int:
        return sum(t.nbytes for t in self.ops.w.values())

    def _release(self) -> None:
        for t in self._owned.values():
            t.zero_()


def _open(opened: OpenedModel, options: NoOptions) -> ShieldedSession:
    return ShieldedSession(opened.cfg, opened.weights, owned=False)


def _protect(opened: OpenedModel, options: NoOptions) -> Protected:
    return Protected(ShieldedSecrets(dict(opened.weights)), {})


def _open_protected(art: Opened, options: NoOptions) -> ShieldedSession:
    return ShieldedSession(art.cfg, ShieldedSecrets.from_sealed(art.tensors, art.meta).weights,
                           owned=True)


SHIELDED = Scheme(
    name="shielded", system="whole model in the TEE", protects="model weights", trusted="the TEE",
    sees="nothing", kind="tee", status="**implemented**", options=NoOptions, support=TorchOps.support,
    placement=(Placement("everything", "enclave", "—", "—"),),
    tolerance=Tolerance(tiny=0.0, default=0.0), open=_open, protect=_protect,
    open_protected=_open_protected)
