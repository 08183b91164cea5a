"""`HeOps`: the CKKS executor of the one forward (the server's side of the `he` scheme).

The server holds the model in plaintext and runs `hidden_states` over encrypted input embeddings;
every tensor is an `Enc` (layout.py). How each op is evaluated:

  linear      plaintext × ciphertext by the generalised-diagonal method with baby-step/giant-step
              rotations (one level); a pending per-slot affine map on the input (affine norms, the
              norm's weight, attention's 1/L) and, for q/k, the rotary embedding (cos/sin per slot,
              and the rotate-half matrix) are folded into the diagonals, so they cost no level
  attention   Power-Softmax over diagonals: for each offset r, s_r = q ⊙ rot(k, −r) summed over a
              head's features by rotations, masked (causal, one slot per head) and replicated;
              s_r^p by squaring; Σ_r s_r^p; Goldschmidt's 1/z of the length-agnostic denominator
              (z ∈ [ε/(ε+B^p), 1], the iteration count from that bound); Σ_r s_r^p ⊙ rot(v, −r)
              times 1/z, with the public 1/(L·(ε+B^p)) left pending for Wo
  activation  the model's polynomial (quad or poly) in the power basis
  norm        affine: pending (free); poly: x·q(mean x²) under HE; rms: the client computes it
              exactly during a refresh (it then sees that activation — docs/he.md)
  final norm, LM head: the client's (it decrypts the last position's hidden state)

SEAL has no bootstrapping. Before each op the executor checks the levels the op and what must
follow it need; when a ciphertext is short of them it is *refreshed*: sent to the client, who
decrypts and re-encrypts it at the top level (additively masked by the server when `mask` is on,
so the client sees x + R, R uniform in ±mask_bound from a CSPRNG). Each refresh is counted in the
cost record with its kind and bytes; `plan()` replays the same rule without encryption.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from veil.backends.plain import rope_tables
from veil.csprng import SecretRng
from veil.errors import ConfigError, ProtocolAbort, UnsupportedError
from veil.he.ckks import Ct, Engine
from veil.he.layout import Enc, Layout, diagonals, pow2_at_least, spread
from veil.he.support import SUPPORT
from veil.he.poly import eval_poly, goldschmidt, goldschmidt_iterations, poly_depth, power, \
    power_depth
from veil.model.config import ModelConfig
from veil.model.ops import Step

# Goldschmidt's headroom: its input z = (u + ε)/(ε + B^p) is ≤ 1 when every row keeps the
# model's bound, but a trained model keeps it on ~99.9% of rows only (the small model peaks at
# z ≈ 2.1, power_quality.md); Goldschmidt diverges from z = 2, so it reads z/2 by default
Z_MAX = 2.0

CATEGORIES = ("plain×cipher", "cipher×cipher", "softmax", "activation", "norm", "refresh", "other")

# Refresh: (ciphertexts, kind, n tokens, width) → fresh ciphertexts. kind "plain" (re-encrypt) or
# "rms" (the client normalises each token's row first).
Refresh = Callable[[list[Ct], str, int, int], list[Ct]]


def act_coeffs(cfg: ModelConfig) -> tuple[float, ...]:
    if cfg.activation == "quad":
        c2, c1, c0 = cfg.quad
        return (c0, c1, c2)
    return tuple(cfg.poly)


def gs_bounds(cfg: ModelConfig, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Per token t < n: (1/D_t, c_t) with z_t = Y_t/D_t + c_t ∈ [c_t, 1] (Y_t = Σ_j s_tj^p ≤ L_t·B^p),
    and the smallest c_t (Goldschmidt's lower bound)."""
    if cfg.score_bound <= 0:
        raise UnsupportedError("he: the model has no score bound (score_bound = 0): the "
                               "Goldschmidt range is unknown; train it with `veil train power`")
    L = np.arange(1, n + 1, dtype=np.float64)
    bp = cfg.score_bound ** cfg.power_p
    eps = cfg.power_eps
    if cfg.power_length_agnostic:
        D = L * (eps + bp)
        c = L * eps / D
    else:
        D = eps + L * bp
        c = eps / D
    return 1.0 / D, c, float(c.min())


@dataclass
class HeCost:
    """One encrypted forward's costs, in the paper's categories."""

    seconds: dict[str, float] = field(default_factory=lambda: {c: 0.0 for c in CATEGORIES})
    refreshes: list[dict] = field(default_factory=list)
    levels_used: int = 0

    def as_dict(self) -> dict:
        return {"seconds": {k: round(v, 4) for k, v in self.seconds.items()},
                "refreshes": len(self.refreshes), "refresh_detail": self.refreshes,
                "levels_used": self.levels_used}


class HeOps:
    """Executes the forward on ciphertexts (see the module docstring)."""

    name = "he"
    support = SUPPORT

    def __init__(self, cfg: ModelConfig, weights: dict[str, Any], eng: Engine, lay: Layout,
                 refresh: Refresh, gs_tol: float = 1e-3, mask: bool = True,
                 mask_bound: float = 64.0, z_max: float = Z_MAX) -> None:
        if lay.C % cfg.head_dim:
            raise ConfigError(f"he: head_dim {cfg.head_dim} must divide the chunk width {lay.C}")
        self.cfg, self.eng, self.lay, self.refresh_fn = cfg, eng, lay, refresh
        self.mask, self.mask_bound, self.gs_tol = mask, mask_bound, gs_tol
        if not z_max >= 1:
            raise ConfigError(f"he: z_max must be ≥ 1, got {z_max}")
        self.z_max = z_max
        G = cfg.n_heads // cfg.n_kv_heads
        self.w: dict[str, np.ndarray] = {}
        for k, v in weights.items():
            a = v.detach().double().numpy() if hasattr(v, "detach") else np.asarray(v, float)
            if G > 1 and (".attn.k." in k or ".attn.v." in k):
                # each query head reads its kv head: expand so q and k/v share one layout
                a = np.repeat(a.reshape(cfg.n_kv_heads, cfg.head_dim, *a.shape[1:]), G, axis=0)
                a = a.reshape(cfg.q_dim, *a.shape[2:])
            self.w[k] = a
        self.rng = SecretRng()
        self.cost = HeCost()
        self._cat: str | None = None
        self._diag_cache: dict[tuple, np.ndarray] = {}
        self.n = 0
        self.gs_iters = 0
        self.cos, self.sin = (t.double().numpy() for t in rope_tables(cfg))

    # ---- bookkeeping ----------------------------------------------------------------------
    @contextmanager
    def category(self, name: str):
        outer, self._cat = self._cat, name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.cost.seconds[name] += dt
            if outer is not None and outer != name:
                self.cost.seconds[outer] -= dt     # nested: counted once, in the inner one
            self._cat = outer

    def begin(self, n: int) -> None:
        """Start one forward over n tokens."""
        if n > self.lay.T:
            raise ConfigError(f"he: {n} tokens exceed the session's period T={self.lay.T}")
        self.n = n
        self.cost = HeCost()
        inv_D, c0, z_min = gs_bounds(self.cfg, n)
        # Goldschmidt reads z / z_max: accurate to gs_tol on [z_min, z_max], convergent up to
        # 2·z_max — headroom for rows whose denominator exceeds the model's bound B^p
        self.inv_D, self.c0 = inv_D / self.z_max, c0 / self.z_max
        self.gs_iters = goldschmidt_iterations(z_min / self.z_max, self.gs_tol)

    # ---- levels and refresh ---------------------------------------------------------------
    def level(self, x: Enc) -> int:
        return min(self.eng.level(c) for c in x.cts)

    def att_need(self) -> int:
        """Levels q/k must have on entering attention: scores 2, the power, the value product 1,
        and 1 for the product with 1/z."""
        return 4 + power_depth(self.cfg.power_p)

    def mlp_need(self) -> int:
        gated = 1 if self.cfg.mlp == "gated" else 0
        return 1 + poly_depth(act_coeffs(self.cfg)) + gated + 1

    def ensure(self, x: Enc, need: int, why: str) -> Enc:
        if need > self.eng.params.levels:
            raise ConfigError(f"he: {why} needs {need} levels; {self.eng.params.name} has "
                              f"{self.eng.params.levels}")
        if self.level(x) >= need:
            return x
        return self._refresh(x, "plain", why)

    def _refresh(self, x: Enc, kind: str, why: str) -> Enc:
        with self.category("refresh"):
            self.cost.levels_used += self.eng.params.levels - self.level(x)
            cts, masks = list(x.cts), None
            if kind == "plain" and self.mask:
                masks = [self.rng.uniform(self.eng.slots, -self.mask_bound, self.mask_bound)
                         .double().numpy() for _ in cts]
                cts = [self.eng.add_plain(c, m) for c, m in zip(cts, masks)]
            fresh = self.refresh_fn(cts, kind, self.n, x.width)
            if len(fresh) != len(cts):
                raise ConfigError(f"he: the client returned {len(fresh)} ciphertexts for "
                                  f"{len(cts)}")
            if masks is not None:
                fresh = [self.eng.add_plain(c, -m) for c, m in zip(fresh, masks)]
            self.cost.refreshes.append({"kind": kind, "why": why, "ciphertexts": len(cts),
                                        "masked": masks is not None})
        return Enc(fresh, x.width, x.scale, x.bias, x.roped, dict(x.meta))

    def _materialise(self, x: Enc) -> Enc:
        """Apply a pending affine map (one level)."""
        if x.scale is None and x.bias is None:
            return x
        cts = []
        for i, c in enumerate(x.cts):
            if x.scale is not None:
                c = self.eng.mul_plain(c, x.scale[i])
            if x.bias is not None:
                c = self.eng.add_plain(c, x.bias[i])
            cts.append(c)
        return Enc(cts, x.width, roped=x.roped, meta=dict(x.meta))

    # ---- linear ---------------------------------------------------------------------------
    def _diag(self, key: str, W: np.ndarray, o: int, i: int) -> np.ndarray:
        k = (key, o, i)
        if k not in self._diag_cache:
            self._diag_cache[k] = diagonals(W, self.lay, o, i)
        return self._diag_cache[k]

    def _rope_tables(self, width: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        hd, n, T = self.cfg.head_dim, self.n, self.lay.T
        feat = np.arange(width) % hd
        cos = np.zeros((width, T))
        sin = np.zeros((width, T))
        cos[:, :n] = self.cos[:n, feat].T
        sin[:, :n] = self.sin[:n, feat].T
        return self.lay.per_slot(cos), self.lay.per_slot(sin)

    def _rotate_half(self, W: np.ndarray) -> np.ndarray:
        """R·W, R the rotate-half map of each head: (Ry)[j] = −y[j + hd/2] | y[j − hd/2]."""
        hd = self.cfg.head_dim
        Wh = W.reshape(-1, hd, W.shape[-1])
        return np.concatenate([-Wh[:, hd // 2:], Wh[:, :hd // 2]], axis=1).reshape(W.shape)

    def _matmul(self, x: Enc, name: str, rope: bool) -> Enc:
        lay, eng = self.lay, self.eng
        W = self.w[f"{name}.weight"]
        out_w, in_w = W.shape
        if in_w != x.width:
            raise ConfigError(f"he: {name} reads {in_w} features, got {x.width}")
        n_in, n_out = lay.chunks(in_w), lay.chunks(out_w)
        C, T = lay.C, lay.T
        g = 1 << math.ceil(math.log2(math.sqrt(C)))
        giant = C // g
        level = self.level(x)
        if level < 1:
            raise ConfigError(f"he: {name}: no level left (the depth plan is wrong)")
        baby = [[eng.rotate(c, b * T) if b else c for b in range(g)] for c in x.cts]
        pre = x.scale
        RW = self._rotate_half(W) if rope else None
        cos, sin = self._rope_tables(out_w) if rope else (None, None)
        symbolic = eng.symbolic            # a depth plan: counts, no slot vectors
        ks = np.arange(C)
        roll_k = (np.arange(lay.slots)[None, :] + ks[:, None] * T) % lay.slots   # rot(·, k·T)
        out = []
        for o in range(n_out):
            rows: list[np.ndarray | None] = []
            for i in range(n_in):
                D = self._diag(name, W, o, i)
                DR = self._diag(name + "#R", RW, o, i) if rope else None
                if symbolic:
                    nz = D.any(axis=1) | (DR.any(axis=1) if rope else False)
                    rows.append(nz)
                    continue
                full = spread(D, lay)
                if rope:
                    full = cos[o] * full + sin[o] * spread(DR, lay)
                if pre is not None:
                    full = full * pre[i][roll_k]
                rows.append(full)
            acc = None
            for a in range(giant):
                terms = []
                back = (np.arange(lay.slots) - a * g * T) % lay.slots      # rot(·, −a·g·T)
                for i in range(n_in):
                    for b in range(g):
                        k = a * g + b
                        if symbolic:
                            if rows[i][k]:
                                terms.append(eng.mul_plain_raw(baby[i][b], eng.multiplier(None, level)))
                            continue
                        d = rows[i][k]
                        if not d.any():
                            continue
                        # undone by the giant rotation
                        terms.append(eng.mul_plain_raw(baby[i][b], eng.multiplier(d[back], level)))
                if not terms:
                    continue
                part = eng.rescale(eng.add_many(terms) if len(terms) > 1 else terms[0])
                part = eng.rotate(part, a * g * T)
                acc = part if acc is None else eng.add(acc, part)
            bias = self._bias_vector(x, name, W, RW, cos, sin, o)
            if acc is None:
                raise ConfigError(f"he: {name} is all zeros in output chunk {o}")
            out.append(eng.add_plain(acc, bias) if bias is not None else acc)
        return Enc(out, out_w, roped=rope)

    def _bias_vector(self, x: Enc, name: str, W: np.ndarray, RW, cos, sin, o: int):
        """Output chunk o's constant part: W·(pending bias) + the layer's own bias (tokens < n),
        roped like the rest of q/k when `RW` is given."""
        lay, T, n = self.lay, self.lay.T, self.n
        const = np.zeros((W.shape[0], T))
        if x.bias is not None:
            const += W @ lay.unpack(x.bias, T, x.width).T
        own = self.w.get(f"{name}.bias")
        if own is not None:
            const[:, :n] += own[:, None]
        if not const.any():
            return None
        vec = lay.per_slot(const)[o]
        if RW is not None:
            vec = cos[o] * vec + sin[o] * lay.per_slot(self._rotate_half(const))[o]
        return vec

    def linear(self, x: Enc, name: str) -> Enc:
        with self.category("plain×cipher"):
            return self._matmul(self.ensure(x, 1, name), name, rope=False)

    def linears(self, x: Enc, names: tuple[str, ...]) -> tuple[Enc, ...]:
        attn = any(n.endswith(".attn.q") for n in names)
        need = 1 + (self.att_need() if attn else self.mlp_need() - 1)
        x = self.ensure(x, need, f"{names[0].rsplit('.', 1)[0]} projections")
        with self.category("plain×cipher"):
            return tuple(self._matmul(x, n, rope=attn and self.cfg.position == "rope"
                                      and n.endswith((".attn.q", ".attn.k"))) for n in names)

    def rope(self, q: Enc, k: Enc, step: Step) -> tuple[Enc, Enc]:
        if not (q.roped and k.roped):
            raise ConfigError("he: rope reached un-roped q/k (the projections fold it in)")
        return q, k

    # ---- attention ------------------------------------------------------------------------
    def attention(self, layer: int, q: Enc, k: Enc, v: Enc, step: Step, cache: Any) -> Enc:
        eng, lay, cfg, n = self.eng, self.lay, self.cfg, self.n
        T, hd = lay.T, cfg.head_dim
        lg = int(math.log2(hd))
        need = self.att_need()
        if self.level(q) < need or self.level(k) < need:
            q, k = (self.ensure(t, need, f"layer {layer} attention") for t in (q, k))
        v = self.ensure(v, need - 2 - power_depth(cfg.power_p), f"layer {layer} values")
        j = np.arange(lay.C)
        t = np.arange(T)
        head_start = (j % hd == 0)[:, None]
        out = []
        for c in range(len(q.cts)):
            kr, vr = k.cts[c], v.cts[c]
            powered, pairs = [], []
            for r in range(n):
                if r:
                    kr, vr = eng.rotate(kr, -1), eng.rotate(vr, -1)
                with self.category("cipher×cipher"):
                    prod = eng.mul(q.cts[c], kr)
                    for i in range(lg):
                        prod = eng.add(prod, eng.rotate(prod, (1 << i) * T))
                    m = head_start & ((t >= r) & (t < n))[None, :]
                    s = eng.mul_plain(prod, np.tile((m / math.sqrt(hd)).reshape(-1), lay.reps))
                    for i in range(lg):
                        s = eng.add(s, eng.rotate(s, -(1 << i) * T))
                with self.category("softmax"):
                    sp = power(eng, s, cfg.power_p)
                powered.append(sp)
                pairs.append((sp, vr))
            with self.category("softmax"):
                Y = eng.add_many(powered) if len(powered) > 1 else powered[0]
                Ye = self.ensure(Enc([Y], 1), self.gs_iters + 2, f"layer {layer} Power-Softmax "
                                 "denominator")
                w = np.zeros(T)
                cc = np.ones(T)
                w[:n], cc[:n] = self.inv_D, self.c0
                z = eng.add_plain(eng.mul_plain(Ye.cts[0], lay.per_token(w)), lay.per_token(cc))
                recip = goldschmidt(eng, z, self.gs_iters)
            with self.category("cipher×cipher"):
                acc = eng.mul_sum(pairs)
                out.append(eng.mul(acc, recip))
        u = np.zeros(T)
        u[:n] = self.inv_D
        return Enc(out, q.width, scale=[lay.per_token(u)] * len(out))

    # ---- elementwise ----------------------------------------------------------------------
    def activation(self, x: Enc) -> Enc:
        coeffs = act_coeffs(self.cfg)
        gated = 1 if self.cfg.mlp == "gated" else 0
        x = self.ensure(self._materialise(x), poly_depth(coeffs) + gated + 1, "activation")
        with self.category("activation"):
            return Enc([eval_poly(self.eng, c, coeffs) for c in x.cts], x.width)

    def mul(self, a: Enc, b: Enc) -> Enc:
        a, b = self._materialise(a), self._materialise(b)
        with self.category("cipher×cipher"):
            return Enc([self.eng.mul(x, y) for x, y in zip(a.cts, b.cts)], a.width)

    def add(self, a: Enc, b: Enc) -> Enc:
        a, b = self._materialise(a), self._materialise(b)
        with self.category("other"):
            return Enc([self.eng.add(x, y) for x, y in zip(a.cts, b.cts)], a.width)

    def norm(self, x: Enc, name: str) -> Enc:
        cfg, lay = self.cfg, self.lay
        if name == "final_norm":
            return Enc(x.cts, x.width, x.scale, x.bias, meta={"final_norm": True})
        follow = 1 + (self.att_need() if name.endswith("attn_norm") else self.mlp_need() - 1)
        wv = self.w[f"{name}.weight"]
        if cfg.norm == "affine":
            scale = lay.per_feature(wv)
            bias = lay.per_feature(self.w[f"{name}.bias"])
            if x.scale is not None or x.bias is not None:
                x = self._materialise(x)
            return Enc(x.cts, x.width, scale, bias)
        x = self._materialise(x)
        if cfg.norm == "rms":
            with self.category("norm"):
                x = self._refresh(x, "rms", name)
            return Enc(x.cts, x.width, lay.per_feature(wv))
        coeffs = tuple(c / x.width ** i for i, c in enumerate(cfg.norm_poly))   # q(S / width)
        own = 1 + poly_depth(coeffs) + 1
        # refresh once for the norm and what reads it when both fit one set's levels
        x = self.ensure(x, own + follow if own + follow <= self.eng.params.levels else own, name)
        with self.category("norm"):
            sq = [self.eng.mul(c, c) for c in x.cts]
            for ci in range(len(sq)):
                for i in range(int(math.log2(lay.C))):
                    sq[ci] = self.eng.add(sq[ci], self.eng.rotate(sq[ci], (1 << i) * lay.T))
            S = self.eng.add_many(sq) if len(sq) > 1 else sq[0]
            qv = eval_poly(self.eng, S, coeffs)
            cts = [self.eng.mul(c, qv) for c in x.cts]
        return Enc(cts, x.width, lay.per_feature(wv))

    # ---- the end of the server's forward --------------------------------------------------
    def last_position(self, x: Enc) -> Enc:
        """Zero every token but the last (the client decrypts only what it asked for)."""
        x = self.ensure(self._materialise(Enc(x.cts, x.width, x.scale, x.bias)), 1, "output")
        keep = np.zeros(self.lay.T)
        keep[self.n - 1] = 1.0
        with self.category("other"):
            return Enc([self.eng.mul_plain(c, self.lay.per_token(keep)) for c in x.cts], x.width)

    # not on the server's path: the client embeds its tokens and reads the logits
    def embed(self, ids: Any) -> Any:
        raise UnsupportedError("he: the client embeds its tokens (the server sees ciphertexts)")

    def pos_embed(self, positions: Any) -> Any:
        raise UnsupportedError("he: learned positions are not supported (rope only)")

    def lm_head(self, x: Any) -> Any:
        raise UnsupportedError("he: the client applies the LM head to its decrypted state")

    def new_cache(self, batch: int, capacity: int) -> None:
        return None


def client_refresh(cfg: ModelConfig, lay: Layout, vals: list[np.ndarray], kind: str, n: int,
                   width: int) -> list[np.ndarray]:
    """The key holder's side of a refresh on decrypted slot vectors: `plain` returns them as they
    are, `rms` the exact RMS norm of the first n tokens' `width` features (the norm's weight is
    left pending on the server)."""
    if kind == "plain":
        return vals
    if kind != "rms":
        raise ProtocolAbort(f"refresh: unknown kind {kind!r}")
    x = lay.unpack(vals, n, width)
    return lay.pack(x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps))


def rotation_steps(cfg: ModelConfig, lay: Layout) -> list[int]:
    """Every rotation the executor performs for this model and layout (the Galois keys the
    client must make)."""
    C, T = lay.C, lay.T
    g = 1 << math.ceil(math.log2(math.sqrt(C)))
    steps = {b * T for b in range(1, g)} | {a * g * T for a in range(1, C // g)}
    lg = int(math.log2(cfg.head_dim))
    steps |= {(1 << i) * T for i in range(lg)} | {-(1 << i) * T for i in range(lg)}
    steps.add(-1)
    if cfg.norm == "poly":
        steps |= {(1 << i) * T for i in range(int(math.log2(C)))}
    half = lay.slots // 2
    return sorted({(s + half) % lay.slots - half for s in steps} - {0})


def choose_layout(cfg: ModelConfig, slots: int, max_tokens: int | None = None) -> Layout:
    """T covers the longest sequence (the context, or `max_tokens`), C the widest chunk that
    fits next to it (at most d_model)."""
    T = pow2_at_least(max_tokens or cfg.max_seq_len)
    C = min(pow2_at_least(cfg.d_model), slots // T)
    if C < cfg.head_dim:
        raise ConfigError(f"he: {slots} slots cannot hold {T} tokens × one head "
                          f"({cfg.head_dim} features); use a larger parameter set or fewer tokens")
    return Layout(T, C, slots)
