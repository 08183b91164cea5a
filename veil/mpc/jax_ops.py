"""`Ops` over jax.numpy: the forward algorithm as a pure function that jax traces and SPU compiles.

The same `forward` (veil/model/forward.py) runs here; what changes is that everything is traced:
weights come in as arrays (secret-shared under SPU), the KV cache is a functional value (updated
with `dynamic_update_slice` at a public slot and returned by the step), and the attention spans
the cache's whole static capacity with a mask, so one compiled decode step serves every position.

Token input is one-hot (B, T, V) — the client knows its own tokens, and under MPC a lookup with
secret ids is a one-hot product anyway; the embedding is `onehot @ E` (vanilla private generation,
MERGE's Table 1 "embedding" row). Positions, `start` and the padding mask are public.

Softmax, activations and norms go through overridable methods (`softmax`, `activation`,
`normalize`), so a backend can swap in MPC-friendly forms (SPU approximates exp/tanh/rsqrt itself; a masked score
must stay a moderate negative number there, see `mask_fill`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from veil.model.config import ModelConfig, rope_inv_freq
from veil.model.ops import Step
from veil.mpc.config import SUPPORT


@dataclass
class JaxCache:
    """Per-layer K/V, (B, n_kv_heads, capacity, head_dim) each; replaced functionally."""

    k: list[Any]
    v: list[Any]

    @staticmethod
    def zeros(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> "JaxCache":
        shape = (batch, cfg.n_kv_heads, capacity, cfg.head_dim)
        return JaxCache([jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)],
                        [jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)])


def rope_tables_np(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (max_seq_len, head_dim) in HF's rotate-half layout (public constants)."""
    inv = np.asarray(rope_inv_freq(cfg), dtype=np.float64)
    angles = np.arange(cfg.max_seq_len, dtype=np.float64)[:, None] * inv[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _write(cache: list[Any], layer: int, x: Any, start: Any, n_heads: int, hd: int) -> None:
    """Write new rows x (B, T, n_heads·hd) into a layer's cache at the public slot `start`."""
    B, T, _ = x.shape
    rows = x.reshape(B, T, n_heads, hd).transpose(0, 2, 1, 3)                 # (B, nkv, T, hd)
    zero = jnp.zeros((), jnp.int32)
    at = (zero, zero, jnp.asarray(start, jnp.int32), zero)
    cache[layer] = jax.lax.dynamic_update_slice(cache[layer], rows.astype(cache[layer].dtype), at)


class JaxOps:
    """Executes the forward on jax arrays in (B, T, features) layout; owns no state but the
    parameters (by canonical name) and the constant tables."""

    name = "jax"
    support = SUPPORT               # plain's variants but Power-Softmax's (MERGE's among them)
    mask_fill = -1e9          # score of a masked key before the softmax (see the module docstring)

    def __init__(self, cfg: ModelConfig, params: dict[str, Any]) -> None:
        self.cfg, self.w = cfg, params
        if cfg.position == "rope":
            self.cos, self.sin = rope_tables_np(cfg)

    # ---- hooks an MPC backend may replace -------------------------------------------------
    def softmax(self, scores: Any, allowed: Any) -> Any:
        """Row softmax over the allowed (public mask) keys."""
        return jax.nn.softmax(jnp.where(allowed, scores, self.mask_fill), axis=-1)

    # ---- Ops --------------------------------------------------------------------------------
    def embed(self, onehot: Any) -> Any:
        return onehot @ self.w["embed.weight"]                                # (B, T, d)

    def pos_embed(self, positions: Any) -> Any:
        return jnp.take(self.w["pos_embed.weight"], positions, axis=0)        # public positions

    def normalize(self, xc: Any) -> Any:
        """xc / √(mean(xc²) + eps) per row."""
        return xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + self.cfg.norm_eps)

    def norm(self, x: Any, name: str) -> Any:
        w = self.w[f"{name}.weight"]
        if self.cfg.norm == "affine":
            return x * w + self.w[f"{name}.bias"]
        if self.cfg.norm == "rms":
            return self.normalize(x) * w
        xc = x - jnp.mean(x, axis=-1, keepdims=True)
        return self.normalize(xc) * w + self.w[f"{name}.bias"]

    def linear(self, x: Any, name: str) -> Any:
        y = x @ self.w[f"{name}.weight"].T
        b = self.w.get(f"{name}.bias")
        return y + b if b is not None else y

    def linears(self, x: Any, names: tuple[str, ...]) -> tuple[Any, ...]:
        return tuple(self.linear(x, n) for n in names)

    def rope(self, q: Any, k: Any, step: Step) -> tuple[Any, Any]:
        hd = self.cfg.head_dim
        cos = jnp.asarray(self.cos)[step.positions][:, :, None, :]           # (B, T, 1, hd)
        sin = jnp.asarray(self.sin)[step.positions][:, :, None, :]
        B, T, _ = q.shape

        def rot(x: Any) -> Any:
            half = hd // 2
            return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)

        qh, kh = q.reshape(B, T, -1, hd), k.reshape(B, T, -1, hd)
        return ((qh * cos + rot(qh) * sin).reshape(B, T, -1),
                (kh * cos + rot(kh) * sin).reshape(B, T, -1))

    def attention(self, layer: int, q: Any, k: Any, v: Any, step: Step, cache: JaxCache) -> Any:
        cfg, hd = self.cfg, self.cfg.head_dim
        if cfg.attention == "constant":
            return self._constant_attention(layer, v, step, cache)
        B, T, _ = q.shape
        nkv, G = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads
        _write(cache.k, layer, k, step.start, nkv, hd)
        _write(cache.v, layer, v, step.start, nkv, hd)
        keys, values = cache.k[layer], cache.v[layer]                         # (B, nkv, S, hd)
        S = keys.shape[2]
        qh = q.reshape(B, T, nkv, G, hd).transpose(0, 2, 3, 1, 4)             # (B, nkv, G, T, hd)
        scores = jnp.einsum("bkgtd,bksd->bkgts", qh, keys) * (1.0 / hd ** 0.5)
        probs = self.softmax(scores, self._allowed(step, T, S))
        out = jnp.einsum("bkgts,bksd->bkgtd", probs, values)                  # (B, nkv, G, T, hd)
        return out.transpose(0, 3, 1, 2, 4).reshape(B, T, cfg.q_dim)

    def _constant_attention(self, layer: int, v: Any, step: Step, cache: JaxCache) -> Any:
        """MERGE: out_h = Σ_s P_h[pos(t), pos(s)] · v_s over the cache's capacity. P (the owner's,
        softmaxed in plaintext: `attn.probs`) is read at public positions — a gather with public
        indices, no comparison or exponential under MPC; slots past the query weigh 0."""
        cfg, hd = self.cfg, self.cfg.head_dim
        B, T, _ = v.shape
        nkv, G = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads
        _write(cache.v, layer, v, step.start, nkv, hd)
        values = cache.v[layer]                                               # (B, nkv, S, hd)
        S = values.shape[2]
        pos = jnp.asarray(step.positions, jnp.int32)                          # (B, T)
        qslot = jnp.asarray(step.start, jnp.int32) + jnp.arange(T)[:, None]
        kpos = pos[:, :, None] - (qslot - jnp.arange(S)[None, :])[None]       # (B, T, S)
        valid = (kpos >= 0) & (kpos <= pos[:, :, None])
        probs = self.w[f"layers.{layer}.attn.probs"]                          # (H, L, L)
        qidx = jnp.broadcast_to(pos[:, :, None], kpos.shape)
        rows = probs[:, qidx, jnp.clip(kpos, 0, cfg.max_seq_len - 1)]         # (H, B, T, S)
        rows = jnp.where(valid[None], rows, 0.0).transpose(1, 0, 2, 3)        # (B, H, T, S)
        out = jnp.einsum("bkgts,bksd->bkgtd", rows.reshape(B, nkv, G, T, S), values)
        return out.transpose(0, 3, 1, 2, 4).reshape(B, T, cfg.q_dim)

    @staticmethod
    def _allowed(step: Step, T: int, S: int) -> Any:
        """(B|1, 1, 1, T, S) public mask: causal over the slots written so far, minus padding;
        a query always sees its own slot (no empty softmax row)."""
        q_slot = jnp.asarray(step.start, jnp.int32) + jnp.arange(T)[:, None]
        k_slot = jnp.arange(S)[None, :]
        allowed = (k_slot <= q_slot)[None]                                    # (1, T, S)
        if step.key_valid is not None:
            allowed = allowed & jnp.asarray(step.key_valid)[:, None, :]       # (B, T, S)
        allowed = allowed | (k_slot == q_slot)[None]
        return allowed[:, None, None]

    def activation(self, x: Any) -> Any:
        kind = self.cfg.activation
        if kind == "quad":
            c2, c1, c0 = self.cfg.quad
            return (c2 * x + c1) * x + c0
        if kind == "silu":
            return jax.nn.silu(x)
        return jax.nn.gelu(x, approximate=kind == "gelu_tanh")

    def mul(self, a: Any, b: Any) -> Any:
        return a * b

    def add(self, a: Any, b: Any) -> Any:
        return a + b

    def last_position(self, x: Any) -> Any:
        return x[:, -1:]

    def lm_head(self, x: Any) -> Any:
        head = self.w["embed.weight" if self.cfg.tie_embeddings else "lm_head.weight"]
        return x @ head.T                                                     # (B, T, V)
