"""`plain`: the torch executor of the forward algorithm — no protection, the reference oracle."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from veil.model.config import ModelConfig, rope_inv_freq
from veil.model.weights import Weights
from veil.model.ops import Step


class KVCache:
    """Preallocated per-layer K/V: (B, n_kv_heads, capacity, head_dim) each."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int) -> None:
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape)
        self.v = torch.zeros(shape)
        self.capacity = capacity

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class _PerLayer:
    """Indexable like a (layers, …) tensor, but one tensor per layer: writing layer i's slots then
    leaves the tensors autograd saved for earlier layers untouched (training needs this)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.t = tensors

    def __getitem__(self, key: tuple) -> torch.Tensor:
        return self.t[key[0]][key[1:]]

    def __setitem__(self, key: tuple, value: torch.Tensor) -> None:
        self.t[key[0]][key[1:]] = value


class TrainCache(KVCache):
    """A KV cache for a differentiable forward over a whole sequence."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int) -> None:
        shape = (batch, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = _PerLayer([torch.zeros(shape) for _ in range(cfg.n_layers)])  # type: ignore
        self.v = _PerLayer([torch.zeros(shape) for _ in range(cfg.n_layers)])  # type: ignore
        self.capacity = capacity


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim) in HF's rotate-half layout."""
    inv = torch.tensor(rope_inv_freq(cfg), dtype=torch.float64)
    angles = torch.arange(cfg.max_seq_len, dtype=torch.float64)[:, None] * inv[None, :]
    angles = torch.cat([angles, angles], dim=-1)                        # (P, hd)
    return angles.cos().float(), angles.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def allowed_keys(step: Step, t_new: int, total: int) -> torch.Tensor:
    """Boolean (B | 1, T, S): which of the cache slots 0..total-1 each new query may attend to —
    causal, minus left padding. A padded query still sees itself, so no row is empty (an empty
    softmax row gives NaN, and NaN times a zero weight still poisons the next layer)."""
    q_slot = torch.arange(step.start, step.start + t_new)[:, None]       # (T, 1)
    k_slot = torch.arange(total)[None, :]                                 # (1, S)
    allowed = (k_slot <= q_slot)[None]                                    # (1, T, S)
    if step.key_valid is not None:
        allowed = allowed & step.key_valid[:, None, :total]               # (B, T, S)
    return allowed | (k_slot == q_slot)[None]


def attention_mask(step: Step, t_new: int, total: int) -> torch.Tensor | None:
    """`allowed_keys` as a (B, 1, T, S) mask, or None when plain causal attention is exact."""
    if step.key_valid is None and (t_new == 1 or step.start == 0):
        return None
    return allowed_keys(step, t_new, total)[:, None]                      # (B, 1, T, S)


def poly_eval(coeffs: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    """Σ_k coeffs[k]·x^k (low → high degree), by Horner's rule."""
    out = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out = out * x + c
    return out


def power_scores(cfg: ModelConfig, q: torch.Tensor, keys: torch.Tensor, step: Step
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Power-Softmax's scores: s (B, nkv, G, T, S) = q·k/√head_dim on the keys each query may
    attend to and exactly 0 elsewhere (a multiplicative mask: the HE backend cannot compare, it
    multiplies by the public 0/1 mask), with that mask (B | 1, 1, 1, T, S). q is (B, T, nh·hd)
    with head h = kv·G + g reading kv head kv (grouped-query attention); keys (B, nkv, S, hd)."""
    B, T, _ = q.shape
    nkv, hd = cfg.n_kv_heads, cfg.head_dim
    qh = q.view(B, T, nkv, cfg.n_heads // nkv, hd).permute(0, 2, 3, 1, 4)   # (B, nkv, G, T, hd)
    scores = qh @ keys[:, :, None].transpose(-1, -2) / math.sqrt(hd)       # (B, nkv, G, T, S)
    allowed = allowed_keys(step, T, keys.shape[2])[:, None, None]         # (B|1, 1, 1, T, S)
    return scores * allowed, allowed


def power_weights(cfg: ModelConfig, s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """a_ij = s_ij^p / (L_i·ε + Σ_j s_ij^p)  (length-agnostic; ε + Σ_j s_ij^p otherwise), L_i the
    number of keys row i may see. Evaluated with the row divided by c_i = max_j |s_ij| + δ and ε
    by c_i^p — the same function, but no power overflows. c_i is a constant of the function
    (the formula does not depend on it), so it is detached: no gradient through the max."""
    p = cfg.power_p
    c = (s.detach().abs().amax(-1, keepdim=True) + cfg.power_delta)        # (…, T, 1)
    r = (s / c).pow(p)
    eps = cfg.power_eps
    if cfg.power_length_agnostic:
        eps = eps * allowed.sum(-1, keepdim=True).to(s.dtype)             # L_i · ε
    return r / (eps / c.pow(p) + r.sum(-1, keepdim=True))


def constant_probs(logits: torch.Tensor) -> torch.Tensor:
    """(H, L, L) learned logits → the causal softmax table: row q spreads over keys 0..q.

    The owner computes this in plaintext (the table is a weight, input-independent), so no softmax
    is ever evaluated under MPC.
    """
    L = logits.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


def constant_rows(probs: torch.Tensor, positions: torch.Tensor, start: int, end: int
                  ) -> torch.Tensor:
    """The table's weights (B, H, T, S) for queries at `positions` (B, T) over cache slots
    0..end-1. A key sits `qslot − s` positions before the query; keys before the row's first
    real token (left padding) land on a negative position and get weight 0."""
    T = positions.shape[1]
    qslot = torch.arange(start, start + T)[:, None]                           # (T, 1)
    kpos = positions[:, :, None] - (qslot - torch.arange(end)[None, :])[None]  # (B, T, S)
    valid = (kpos >= 0) & (kpos <= positions[:, :, None])
    rows = probs[:, positions[:, :, None].expand_as(kpos), kpos.clamp(min=0)]  # (H, B, T, S)
    return (rows * valid).transpose(0, 1)


class TorchOps:
    """Executes the forward with torch tensors held in (B, T, features) layout."""

    name = "plain"
    support = {
        "norm": frozenset({"rms", "layer", "affine", "poly"}),
        "activation": frozenset({"silu", "gelu", "gelu_tanh", "quad", "poly"}),
        "mlp": frozenset({"gated", "plain"}),
        "position": frozenset({"rope", "learned"}),
        "attention": frozenset({"softmax", "constant", "power"}),
        "generation": frozenset({"standard", "embedding_resend"}),
    }

    def __init__(self, cfg: ModelConfig, weights: Weights) -> None:
        self.cfg = cfg
        self.w = weights
        self._rope_for: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._tables: dict[int, torch.Tensor] = {}
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
        if self.cfg.norm == "affine":
            return x * w + self.w[f"{name}.bias"]
        if self.cfg.norm == "rms":
            # written out: faster than F.rms_norm on CPU for decode-sized inputs
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps) * w
        if self.cfg.norm == "poly":
            return x * poly_eval(self.cfg.norm_poly, x.pow(2).mean(-1, keepdim=True)) * w
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
        if cfg.attention == "constant":
            return self._constant_attention(layer, v, step, cache)
        B, T, _ = q.shape
        end = step.start + T
        cache.k[layer, :, :, step.start:end] = k.view(B, T, cfg.n_kv_heads, hd).transpose(1, 2)
        cache.v[layer, :, :, step.start:end] = v.view(B, T, cfg.n_kv_heads, hd).transpose(1, 2)
        keys = cache.k[layer, :, :, :end]                                 # (B, nkv, S, hd)
        values = cache.v[layer, :, :, :end]
        if cfg.attention == "power":
            probs = power_weights(cfg, *self.power_scores(layer, q, keys, step))  # (B,nkv,G,T,S)
            out = probs @ values[:, :, None]                              # (B, nkv, G, T, hd)
            return out.permute(0, 3, 1, 2, 4).reshape(B, T, cfg.q_dim)
        qh = q.view(B, T, cfg.n_heads, hd).transpose(1, 2)               # (B, nh, T, hd)
        mask = attention_mask(step, T, end)
        causal = mask is None and T > 1
        out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask, is_causal=causal,
                                             enable_gqa=cfg.n_kv_heads != cfg.n_heads)
        return out.transpose(1, 2).reshape(B, T, cfg.q_dim)               # (B, T, nh*hd)

    def power_scores(self, layer: int, q: torch.Tensor, keys: torch.Tensor, step: Step
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Power attention's masked scores and mask (`power_scores`); a method so that training's
        range loss (variants/power.py) can note the scores of the one forward."""
        return power_scores(self.cfg, q, keys, step)

    def _constant_attention(self, layer: int, v: torch.Tensor, step: Step,
                            cache: KVCache) -> torch.Tensor:
        """MERGE: out_h = Σ_s P_h[pos(t), pos(s)] · v_s, P the layer's causal-softmaxed table."""
        cfg, hd = self.cfg, self.cfg.head_dim
        B, T, _ = v.shape
        end = step.start + T
        cache.v[layer, :, :, step.start:end] = v.view(B, T, cfg.n_kv_heads, hd).transpose(1, 2)
        values = cache.v[layer, :, :, :end]                               # (B, nkv, S, hd)
        probs = constant_rows(self._probs(layer), step.positions, step.start, end)  # (B,nh,T,S)
        G = cfg.n_heads // cfg.n_kv_heads
        out = probs.view(B, cfg.n_kv_heads, G, T, end) @ values[:, :, None]  # (B,nkv,G,T,hd)
        return out.reshape(B, cfg.n_heads, T, hd).transpose(1, 2).reshape(B, T, cfg.q_dim)

    def _probs(self, layer: int) -> torch.Tensor:
        logits = self.w[f"layers.{layer}.attn.const"]
        if logits.requires_grad:                    # training: the table is being learned
            return constant_probs(logits)
        if layer not in self._tables:
            self._tables[layer] = constant_probs(logits)
        return self._tables[layer]

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.cfg.activation
        if kind == "quad":
            c2, c1, c0 = self.cfg.quad
            return (c2 * x + c1) * x + c0
        if kind == "poly":
            return poly_eval(self.cfg.poly, x)
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
