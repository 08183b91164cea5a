"""`plain`: the torch executor of the forward algorithm — no protection, the reference oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from veil.model.config import ModelConfig, rope_inv_freq
from veil.model.weights import Weights
from veil.ops import Step


class KVCache:
    """Preallocated per-layer K/V: (B, n_kv_heads, capacity, head_dim) each."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int) -> None:
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape)
        self.v = torch.zeros(shape)
        self.capacity = capacity

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim) in HF's rotate-half layout."""
    inv = torch.tensor(rope_inv_freq(cfg), dtype=torch.float64)
    angles = torch.arange(cfg.max_seq_len, dtype=torch.float64)[:, None] * inv[None, :]
    angles = torch.cat([angles, angles], dim=-1)                        # (P, hd)
    return angles.cos().float(), angles.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def attention_mask(step: Step, t_new: int, total: int) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask, or None when plain causal attention is exact.

    A padded query still sees itself, so no softmax row is empty (an empty row gives NaN, and NaN
    times a zero weight still poisons the next layer).
    """
    if step.key_valid is None and (t_new == 1 or step.start == 0):
        return None
    q_slot = torch.arange(step.start, step.start + t_new)[:, None]       # (T, 1)
    k_slot = torch.arange(total)[None, :]                                 # (1, S)
    allowed = (k_slot <= q_slot)[None]                                    # (1, T, S)
    if step.key_valid is not None:
        allowed = allowed & step.key_valid[:, None, :total]               # (B, T, S)
    allowed = allowed | (k_slot == q_slot)[None]
    return allowed[:, None]                                               # (B, 1, T, S)


class TorchOps:
    """Executes the forward with torch tensors held in (B, T, features) layout."""

    name = "plain"
    support = {
        "norm": frozenset({"rms", "layer"}),
        "activation": frozenset({"silu", "gelu", "gelu_tanh"}),
        "mlp": frozenset({"gated", "plain"}),
        "position": frozenset({"rope", "learned"}),
        "attention": frozenset({"softmax"}),
        "generation": frozenset({"standard"}),
    }

    def __init__(self, cfg: ModelConfig, weights: Weights) -> None:
        self.cfg = cfg
        self.w = weights
        self._rope_for: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if cfg.position == "rope":
            self.cos, self.sin = rope_tables(cfg)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.cfg, batch, capacity)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.w["embed.weight"])                  # (B, T, d)

    def pos_embed(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions, self.w["pos_embed.weight"])        # (B, T, d)

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w = self.w[f"{name}.weight"]
        if self.cfg.norm == "rms":
            # written out: faster than F.rms_norm on CPU for decode-sized inputs
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps) * w
        return F.layer_norm(x, (x.shape[-1],), w, self.w[f"{name}.bias"], self.cfg.norm_eps)

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))

    def linears(self, x: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        # Not fused: a fused copy would cost the weights' memory again (checkpoint tensors are
        # views of one file mapping, freed only when all are), for ~4% decode speed.
        return tuple(self.linear(x, n) for n in names)

    def _rope_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, 1, hd) for these positions; every layer of a step shares them."""
        if self._rope_for is None or self._rope_for[0] is not positions:
            cos = self.cos[positions][:, :, None, :]
            sin = self.sin[positions][:, :, None, :]
            self._rope_for = (positions, cos, sin)
        return self._rope_for[1], self._rope_for[2]

    def rope(self, q: torch.Tensor, k: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        hd = self.cfg.head_dim
        cos, sin = self._rope_rows(step.positions)                      # (B, T, 1, hd)
        B, T, _ = q.shape
        qh = q.view(B, T, -1, hd)                                         # (B, T, nh, hd)
        kh = k.view(B, T, -1, hd)                                         # (B, T, nkv, hd)
        qh = qh * cos + _rotate_half(qh) * sin
        kh = kh * cos + _rotate_half(kh) * sin
        return qh.reshape(B, T, -1), kh.reshape(B, T, -1)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  step: Step, cache: KVCache) -> torch.Tensor:
        cfg, hd = self.cfg, self.cfg.head_dim
        B, T, _ = q.shape
        end = step.start + T
        qh = q.view(B, T, cfg.n_heads, hd).transpose(1, 2)               # (B, nh, T, hd)
        cache.k[layer, :, :, step.start:end] = k.view(B, T, cfg.n_kv_heads, hd).transpose(1, 2)
        cache.v[layer, :, :, step.start:end] = v.view(B, T, cfg.n_kv_heads, hd).transpose(1, 2)
        keys = cache.k[layer, :, :, :end]                                 # (B, nkv, S, hd)
        values = cache.v[layer, :, :, :end]
        mask = attention_mask(step, T, end)
        causal = mask is None and T > 1
        out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask, is_causal=causal,
                                             enable_gqa=cfg.n_kv_heads != cfg.n_heads)
        return out.transpose(1, 2).reshape(B, T, cfg.q_dim)               # (B, T, nh*hd)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.cfg.activation
        if kind == "silu":
            return F.silu(x)
        return F.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")

    def mul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def last_position(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1:]

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        head = self.w["embed.weight" if self.cfg.tie_embeddings else "lm_head.weight"]
        return F.linear(x, head)                                          # (B, T, V)
