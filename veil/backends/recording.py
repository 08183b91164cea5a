"""Plain execution that keeps every activation at an op boundary (audits and calibration)."""

from __future__ import annotations

import torch

from veil.backends.plain import TorchOps
from veil.model.config import ModelConfig
from veil.model.weights import Weights
from veil.model.ops import Step


class RecordingOps(TorchOps):
    """Plain execution that keeps every activation the forward produces at an op boundary."""

    def __init__(self, cfg: ModelConfig, weights: Weights) -> None:
        super().__init__(cfg, weights)
        self.records: list[tuple[str, torch.Tensor]] = []

    def _keep(self, tag: str, x: torch.Tensor) -> torch.Tensor:
        self.records.append((tag, x.detach().reshape(-1, x.shape[-1]).clone()))
        return x

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._keep("embed", super().embed(ids))

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        self._keep(f"in:{name}", x)
        return self._keep(f"out:{name}", super().linear(x, name))

    def attention(self, layer: int, q, k, v, step: Step, cache) -> torch.Tensor:
        for tag, t in (("q", q), ("k", k), ("v", v)):
            self._keep(f"attn{layer}.{tag}", t)
        return self._keep(f"attn{layer}.out", super().attention(layer, q, k, v, step, cache))

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        self._keep("in:lm_head", x)
        return self._keep("logits", super().lm_head(x))
