"""The enclave's executor of the forward algorithm: trusted, small, and the only side with secrets.

It runs the one forward (veil/model/forward.py). Cheap ops — norms, activations, RoPE, residual
adds — run here on enclave-held parameters; the heavy linear work and the attention go to the
device through a `Channel`, concealed by the scheme's `LinearProtocol`, and come back to be
revealed. While the device multiplies, the enclave computes its own share of the work (LoRO's
low-rank correction): requests are sent first, the scheme's `precompute` runs, then replies are read.

Attention runs on the device under secret head-block permutations (`HeadPermutation`): per layer a
permutation of the KV heads, of the query heads inside each group, and of the dimensions inside each
head (one for Q/K, another for V). Q·Kᵀ per head is unchanged, so the device's softmax is exact; the
enclave applies RoPE *before* permuting (a permutation does not commute with RoPE's rotation
pairs, and RoPE done on the device would reveal which features pair up), and un-permutes the output.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from veil.backends.plain import TorchOps
from veil.model.config import ModelConfig
from veil.ops import Step
from veil.tee.channel import Channel
from veil.tee.wire import Message


class LinearProtocol(Protocol):
    """How a scheme hides a linear layer y = x Wᵀ + b from the device holding its W'."""

    def conceal(self, group: str, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(N, in) true input → (what the device receives, private context)."""

    def precompute(self, name: str, x: torch.Tensor, ctx: Any) -> Any:
        """Enclave work that overlaps the device's matmul (e.g. LoRO's (xB)A)."""

    def reveal(self, name: str, y_dev: torch.Tensor, pre: Any) -> torch.Tensor:
        """The device's output → the true y (bias included)."""

    def table_rows(self, name: str, ids: torch.Tensor, rows_dev: torch.Tensor) -> torch.Tensor:
        """Rows of an obfuscated table (embeddings) → the true rows."""


def _csprng_perm(n: int) -> torch.Tensor:
    """A uniformly random permutation of range(n) from the OS CSPRNG (Fisher–Yates)."""
    p = list(range(n))
    for i in range(n - 1, 0, -1):
        j = secrets.randbelow(i + 1)
        p[i], p[j] = p[j], p[i]
    return torch.tensor(p, dtype=torch.long)


@dataclass(frozen=True)
class HeadPermutation:
    """Index maps of one layer: device input = true[..., *_src]; true output = device output[..., o_src]."""

    q_src: torch.Tensor   # (nh·hd,)
    k_src: torch.Tensor   # (nkv·hd,)
    v_src: torch.Tensor   # (nkv·hd,)
    o_src: torch.Tensor   # (nh·hd,)

    @staticmethod
    def sample(cfg: ModelConfig) -> "HeadPermutation":
        nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        G = nh // nkv
        sigma = _csprng_perm(nkv)
        q_src = torch.empty(nh * hd, dtype=torch.long)
        k_src = torch.empty(nkv * hd, dtype=torch.long)
        v_src = torch.empty(nkv * hd, dtype=torch.long)
        o_new = torch.empty(nh * hd, dtype=torch.long)   # true feature → its device position
        for g in range(nkv):
            tau, pi, rho = _csprng_perm(G), _csprng_perm(hd), _csprng_perm(hd)
            sg = int(sigma[g])
            # device position (σ(g), π_g(d)) holds true (g, d) for K; ρ_g for V
            k_src[sg * hd + pi] = g * hd + torch.arange(hd)
            v_src[sg * hd + rho] = g * hd + torch.arange(hd)
            for j in range(G):
                new_h, old_h = sg * G + int(tau[j]), g * G + j
                q_src[new_h * hd + pi] = old_h * hd + torch.arange(hd)
                o_new[old_h * hd + torch.arange(hd)] = new_h * hd + rho
        return HeadPermutation(q_src, k_src, v_src, o_new)

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        return {f"layers.{layer}.perm.{k}": getattr(self, k) for k in ("q_src", "k_src", "v_src", "o_src")}


class EnclaveOps(TorchOps):
    """Ops for the enclave: local elementwise work, device calls for linears and attention."""

    name = "tee"

    def __init__(self, cfg: ModelConfig, local: dict[str, torch.Tensor], protocol: LinearProtocol,
                 perms: list[HeadPermutation], channel: Channel, scheme: str) -> None:
        super().__init__(cfg, local)
        self.protocol, self.perms, self.channel = protocol, perms, channel
        self.name = scheme

    def new_cache(self, batch: int, capacity: int) -> None:
        c = self.cfg
        self.channel.call("cache", layers=c.n_layers, batch=batch, capacity=capacity,
                          kv_heads=c.n_kv_heads, head_dim=c.head_dim)
        prepare = getattr(self.protocol, "prepare", None)
        if prepare is not None:
            prepare(batch * capacity)
        return None

    def _rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64)
        rows = self.channel.call("rows", [flat], name=f"{name}.weight").tensors[0]
        return self.protocol.table_rows(name, flat, rows).view(*ids.shape, -1)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._rows("embed", ids)                                   # (B, T, d)

    def pos_embed(self, positions: torch.Tensor) -> torch.Tensor:
        return self._rows("pos_embed", positions)                         # (B, T, d)

    def linears(self, x: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])                                 # (N, in)
        group = names[0]
        x_dev, ctx = self.protocol.conceal(group, flat)
        self.channel.send(Message("linear", {"names": list(names)}, [x_dev]))
        pre = [self.protocol.precompute(n, flat, ctx) for n in names]    # overlaps the device
        outs = self.channel.reply().tensors
        return tuple(self.protocol.reveal(n, y, p).view(*lead, -1) for n, y, p in zip(names, outs, pre))

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.linears(x, (name,))[0]

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  step: Step, cache: Any) -> torch.Tensor:
        p = self.perms[layer]
        tensors = [q[..., p.q_src], k[..., p.k_src], v[..., p.v_src]]
        if step.key_valid is not None:
            tensors.append(step.key_valid)
        out = self.channel.call("attention", tensors, layer=layer, start=step.start,
                                n_heads=self.cfg.n_heads, head_dim=self.cfg.head_dim).tensors[0]
        return out[..., p.o_src]                                          # (B, T, nh*hd)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        name = "embed" if self.cfg.tie_embeddings else "lm_head"
        return self.linear(x, name)                                       # (B, T, V)
