"""KV-Shield (MobiArch'24) on the split runtime: the user's conversation in the untrusted device's
KV cache kept under secret transforms, the TEE removing them from the attention output.

The paper's scheme: the device holds W_{q,k,v}·RPM (a random permutation matrix, one per layer),
so q, k, v — and the cache — come out permuted; QKᵀ is unchanged; the TEE un-permutes a = aᵖ·RPMᵀ.
As written, one d×d permutation per layer breaks multi-head models (a permutation across heads
changes every head's scores) and RoPE (rotation pairs have distinct frequencies). veil's version:
  - transforms are head-block ones (veil/tee/mixing.py): KV heads permuted with their GQA query
    groups, inside each group one transform for Q/K and one for V;
  - `fold=True` (the paper's dataflow): the transform is folded into the device's W_q/W_k/W_v (and
    their biases), so the device's projections emit transformed rows. For a RoPE model the Q/K
    transform is then drawn from the family that commutes with RoPE (per-pair 2×2 rotations:
    RoPE applied to transformed rows equals the transform of RoPE'd rows), which is weaker;
  - `fold=False`: the device's projections are the public ones; the enclave applies RoPE and then
    the transform (any head-block permutation/rotation, or `padded`) before the device attends;
  - fresh transforms per conversation: every new KV cache draws new ones from a new key (folded
    weights are re-sent), so known text in one conversation says nothing about the next;
  - the token ids never reach the device: the embedding lookup runs in the enclave.
What it does not hide: the device computes every linear layer of the public model on the clear
hidden states it receives (it holds public weights; only the enclave's norms and the head-block
transforms are secret). A device that records what it receives reads the conversation from layer
0's inputs; KV-Shield protects the resident cache against a memory snapshot, not the inputs
against the device itself. veil/attacks/kv_inversion.py measures both views.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from veil.csprng import SecretRng
from veil.model.config import ModelConfig
from veil.model.ops import Step
from veil.model.weights import Weights
from veil.tee.mixing import FreshMixings, HeadMixing
from veil.tee.pads import PadCost
from veil.tee.process import DeviceHandle
from veil.tee.deferred import DeferredOps
from veil.tee.runtime import attention_calibration

# the enclave looks tokens up itself and runs the cheap ops; everything else is public weights
_ENCLAVE_TABLES = ("embed.weight", "pos_embed.weight")
_QKV_BIAS = re.compile(r"layers\.\d+\.attn\.[qkv]\.bias")


class PublicProtocol:
    """The linear protocol of a device holding public weights: nothing to conceal or reveal.
    (kvshield's Ops send whole programs instead — veil/tee/deferred.py — so only the cost
    counters read it.)"""

    enclave_flops = 0
    overlap_flops = 0

    def prepare(self, rows: int) -> None:
        """Nothing offline: nothing is masked."""

    def pad_cost(self) -> PadCost | None:
        return None

    def nbytes(self) -> int:
        return 0

    def wipe(self) -> None:
        """No secrets of its own."""

    def conceal(self, group: str, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return x, None

    def request_args(self, ctx: Any) -> dict:
        return {}

    def precompute(self, name: str, x: torch.Tensor, ctx: Any,
                   fetched: torch.Tensor | None = None) -> Any:
        return None

    def reveal(self, name: str, y_dev: torch.Tensor, pre: Any, ctx: Any = None) -> torch.Tensor:
        return y_dev

    def table_rows(self, name: str, ids: torch.Tensor, rows_dev: torch.Tensor) -> torch.Tensor:
        raise AssertionError("kvshield keeps the tables in the enclave")


@dataclass
class KvShieldSecrets:
    """What kvshield's enclave keeps: the embedding tables (so ids stay inside), and per layer the K and V padding scales (the rms of the layer's true rows on random tokens,
    measured when the model is protected), and the q/k/v biases to fold. Nothing here is a
    transform: those are drawn per
    conversation and never sealed."""

    enclave: dict[str, torch.Tensor]
    scales: torch.Tensor          # (layers, 2)

    def wipe(self, weights: bool = False) -> None:
        for t in self.enclave.values() if weights else ():
            t.zero_()

    def to_sealable(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {**{f"enclave.{k}": v for k, v in self.enclave.items()}, "pad_scales": self.scales}, {}

    @staticmethod
    def from_sealed(t: dict[str, torch.Tensor], meta: dict) -> "KvShieldSecrets":
        return KvShieldSecrets({k.removeprefix("enclave."): v for k, v in t.items()
                                if k.startswith("enclave.")}, t["pad_scales"])


def protect_kvshield(cfg: ModelConfig, weights: Weights
                     ) -> tuple[KvShieldSecrets, dict[str, torch.Tensor]]:
    """The enclave's parameters and the device's weights: every parameter of the public model but
    the embedding tables (the LM head stays: with tied embeddings the device holds the table as
    the head's weight — the weights are public; the ids are what stays inside)."""
    calib = attention_calibration(cfg, weights, SecretRng())
    scales = torch.stack([torch.stack([c["k"].float().pow(2).mean().sqrt(),
                                       c["v"].float().pow(2).mean().sqrt()]) for c in calib])
    # plus the q/k/v biases (public too), which fold=true transforms with the weights
    enclave = {k: v for k, v in weights.items() if k in _ENCLAVE_TABLES or _QKV_BIAS.match(k)}
    device = {k: v for k, v in weights.items() if k not in _ENCLAVE_TABLES}
    if cfg.tie_embeddings:
        device["embed.weight"] = weights["embed.weight"]
    return KvShieldSecrets(enclave, scales), device


class KvShieldOps(DeferredOps):
    """The enclave of kvshield: tables looked up locally; the public model's work sent to the
    device as one program per layer (fold) or two (the enclave transforms q/k/v itself);
    attention on the device under transforms drawn anew for every new cache."""

    def __init__(self, cfg: ModelConfig, secrets_: KvShieldSecrets, mixing: str, width: int,
                 pad_scale: float, fold: bool, device: DeviceHandle,
                 weight_of: Callable[[str], torch.Tensor]) -> None:
        super().__init__(cfg, dict(secrets_.enclave), PublicProtocol(), [], device.channel,
                         "kvshield", device=device)
        self.scales, self.fold, self.weight_of = secrets_.scales, fold, weight_of
        # the public q/k/v biases, to fold (the device's copies are replaced by folded ones)
        self.biases = {k.removesuffix(".bias"): v for k, v in secrets_.enclave.items()
                       if _QKV_BIAS.match(k)}
        rope_commuting = fold and cfg.position == "rope"

        def draw() -> list[HeadMixing]:
            rng = SecretRng()           # a new key per conversation
            return [HeadMixing.sample(cfg, mixing, rng=rng, width=width,
                                      pad_scales=self.scales[i] * pad_scale,
                                      rope_commuting=rope_commuting)
                    for i in range(cfg.n_layers)]

        self.fresh = FreshMixings(draw)

    def new_cache(self, batch: int, capacity: int) -> None:
        super().new_cache(batch, capacity)
        if self.fold:
            self._send_folded()

    def _send_folded(self) -> None:
        """This conversation's W_q/W_k/W_v (·R, ·R, ·S per head block) and biases to the device."""
        hd = self.cfg.head_dim
        names, tensors = [], []
        for i, mix in enumerate(self.perms):
            for which in "qkv":
                n = f"layers.{i}.attn.{which}"
                w, fb = mix.fold(self.weight_of(n), self.biases.get(n), which, hd)
                names.append(f"{n}.weight")
                tensors.append(w)
                if fb is not None:
                    names.append(f"{n}.bias")
                    tensors.append(fb)
        # set-up traffic, not the model's: a frame carries at most 64 tensors
        for s in range(0, len(names), 48):
            self.channel.call_uncounted("put", tensors[s:s + 48], names=names[s:s + 48])
        self.setup_bytes += sum(t.nbytes for t in tensors)

    def attention(self, layer: int, q: Any, k: Any, v: Any, step: Step, cache: Any) -> torch.Tensor:
        hd = self.cfg.head_dim
        D = hd + self.perms[layer].width(hd)
        if not self.fold:  # q, k (RoPE'd on the device), v back here, transformed, sent again
            q, k, v = self.mix_in(layer, *self.fetch(q, k, v))
        # (folded: the device's projections applied R and S — its program goes on)
        out = self.device_attention(layer, q, k, v, step, D, 1 / math.sqrt(hd), "attention")
        return self.mix_out(layer, out)


def run_kvshield(cfg: ModelConfig, secrets_: KvShieldSecrets, mixing: str, width: int,
                 pad_scale: float, fold: bool, device: DeviceHandle,
                 weight_of: Callable[[str], torch.Tensor]) -> KvShieldOps:
    return KvShieldOps(cfg, secrets_, mixing, width, pad_scale, fold, device, weight_of)
