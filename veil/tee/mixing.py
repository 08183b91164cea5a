"""Secret head-block transforms of attention inputs, exact for the device's softmax(QKᵀ)V.

The device computes attention on, and caches, what the enclave sends: per layer the KV heads are
permuted (query heads move with their GQA group and are permuted inside it), and inside each group
Q and K are multiplied by one orthogonal R_g (Q R_g (K R_g)ᵀ = QKᵀ) and V by another, S_g, which
the enclave removes from the output (· S_gᵀ). Three families:
  permute  R_g, S_g permutation matrices (KV-Shield's RPM, TLG's and LoRO's head-block permutations)
  rotate   Haar-random rotations (they also mix feature values)
  padded   each head vector first extended by `width` secret dimensions — K and V with fresh
           Gaussian noise per token, Q with zeros, so scores are unchanged and the extra output
           columns are dropped — then a Haar rotation of the extended vector: a cached row's norm
           and its inner products with other rows no longer equal the true ones.
RoPE: neither a permutation nor a general rotation commutes with RoPE's per-pair frequencies, so
the enclave applies RoPE *before* the transform. A transform folded into the device's weights
(KV-Shield's W·RPM) is applied before RoPE, so for a RoPE model `sample(..., rope_commuting=True)`
draws R_g from the transforms that do commute: one 2×2 rotation per frequency pair (i, i + hd/2) —
any angle for `rotate`, a multiple of 90° (a signed swap) for `permute`. S_g (values) is free.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from veil.csprng import SecretRng
from veil.model.config import ModelConfig

KINDS = ("permute", "rotate", "padded")


def _orthogonal(n: int, kind: str, rng: SecretRng) -> torch.Tensor:
    """A secret n×n orthogonal matrix: Haar-random (`rotate`, `padded`) or a uniform permutation
    (`permute`).

    QR of a Gaussian matrix alone is not Haar (its Q depends on LAPACK's sign convention for R);
    scaling Q's columns by sign(diag R) makes R's diagonal positive, and then Q is Haar."""
    if kind == "permute":
        return torch.eye(n)[rng.perm(n)]
    q, r = torch.linalg.qr(rng.randn(n, n, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def _rope_commuting(hd: int, kind: str, rng: SecretRng) -> torch.Tensor:
    """A secret hd×hd transform that commutes with RoPE (rotate-half layout): per frequency pair
    (i, i + hd/2) a 2×2 rotation — RoPE rotates each pair in its plane, and plane rotations
    commute. `permute`: angles in {0°, 90°, 180°, 270°} (a signed swap or sign flip per pair)."""
    h = hd // 2
    if kind == "permute":
        angles = rng.randint(0, 4, h).double() * (math.pi / 2)
    else:
        angles = rng.uniform(h, 0.0, 2 * math.pi, dtype=torch.float64)
    c, s = angles.cos(), angles.sin()
    m = torch.zeros(hd, hd, dtype=torch.float64)
    i = torch.arange(h)
    # row vector convention (x ↦ x·m), the same form as RoPE's own pair rotation
    m[i, i], m[i, i + h], m[i + h, i], m[i + h, i + h] = c, s, -s, c
    return m.round(decimals=12).float() if kind == "permute" else m.float()


@dataclass(frozen=True)
class HeadMixing:
    """One layer's secret transform (see the module docstring).

    Device head slot i holds true query head `q_heads[i]` (KV head `k_heads[j]` for slot j); r and
    s are stored per KV slot, (nkv, D, D) with D = head_dim + width. `scales` (padded only): the
    standard deviation of the K and V padding, the layer's own rms (so the pad's energy matches
    the rows it hides)."""

    q_heads: torch.Tensor    # (nh,)  true query head in each device slot
    k_heads: torch.Tensor    # (nkv,) true KV head in each device slot
    r: torch.Tensor          # (nkv, D, D)  R of the group in each KV slot j (for Q and K)
    s: torch.Tensor          # (nkv, D, D)  S of the group in each KV slot j (for V)
    scales: torch.Tensor = field(default_factory=lambda: torch.zeros(2))   # (2,) pad std: K, V

    def __post_init__(self) -> None:
        # derived, not sealed: the inverse query permutation, and S per slot transposed (= S⁻¹)
        object.__setattr__(self, "_q_inv", torch.argsort(self.q_heads))
        object.__setattr__(self, "_s_t", self.s.transpose(-1, -2))
        # (signed) permutation matrices are gathers on real hardware: data movement, no FLOPs
        object.__setattr__(self, "rotates", bool(((self.r != 0) & (self.r.abs() != 1)).any()
                                                 or ((self.s != 0) & (self.s.abs() != 1)).any()))
        # the pads are drawn per token as rows are sent: a keystream of the mixing's own
        object.__setattr__(self, "_pad_rng", SecretRng() if bool((self.scales > 0).any()) else None)
        object.__setattr__(self, "pad_bytes", [0])

    def width(self, hd: int) -> int:
        """The dimensions added to each head vector (0 unless padded)."""
        return int(self.r.shape[-1]) - hd

    @staticmethod
    def sample(cfg: ModelConfig, kind: str = "rotate", calib: dict[str, torch.Tensor] | None = None,
               tol: float = 0.05, rng: SecretRng | None = None, width: int = 0,
               pad_scales: torch.Tensor | None = None, rope_commuting: bool = False
               ) -> "HeadMixing":
        """Draw a layer's transform from `rng` (a fresh `SecretRng` when None).

        calib: true q, k, v rows (N, features) of this layer on calibration input. A random
        orthogonal matrix aligns by chance with the data's dominant directions (|cos| between a
        64-dim head and its transform has a spread of ~0.1); with calibration, each R_g and S_g
        is redrawn until that alignment is below `tol`, so the device's copy is decorrelated
        from the true tensors, not just scrambled. The constraint is one scalar per matrix.
        width, pad_scales (padded): the added dimensions, and the K and V pad std (2,).
        rope_commuting: R_g from the RoPE-commuting family (for transforms folded into weights)."""
        if kind not in KINDS:
            raise ValueError(f"unknown mixing {kind!r} (one of {', '.join(KINDS)})")
        nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        G = nh // nkv
        rng = SecretRng() if rng is None else rng
        padded = kind == "padded"
        if padded and (width < 1 or pad_scales is None):
            raise ValueError("padded mixing needs width ≥ 1 and pad scales")
        if padded and rope_commuting:
            raise ValueError("padded mixing cannot be folded into weights")
        D = hd + (width if padded else 0)
        sigma = rng.perm(nkv)                         # slot j ← true KV head sigma[j]
        q_heads = torch.cat([sigma[j] * G + rng.perm(G) for j in range(nkv)])

        def cross(x: torch.Tensor, n_heads: int, slots: torch.Tensor) -> list[torch.Tensor]:
            """Per true head g: Σ over slots holding g of (slot's true rows)ᵀ(g's rows), normalised."""
            h = x.double().reshape(-1, n_heads, hd)
            out = [torch.zeros(hd, hd, dtype=torch.float64) for _ in range(nkv)]
            for slot, src in enumerate(slots.tolist()):
                c = h[:, slot].t() @ h[:, src]
                out[src // (n_heads // nkv)] += c / (h[:, slot].norm() * h[:, src].norm() + 1e-30)
            return out

        def one(for_qk: bool) -> torch.Tensor:
            if for_qk and rope_commuting:
                return _rope_commuting(hd, kind, rng)
            return _orthogonal(D, kind, rng)

        def draw(constraints: list[torch.Tensor], for_qk: bool) -> torch.Tensor:
            best, best_score = None, float("inf")
            for _ in range(200):
                m = one(for_qk)
                # the head's own block of the (extended) transform is what meets its true rows
                score = max((float((c * m[:hd, :hd].double().t()).sum().abs()) for c in constraints),
                            default=0.0)
                if score < best_score:
                    best, best_score = m, score
                if score < tol:
                    break
            assert best is not None
            return best

        if calib is not None and not padded:
            ck, cq, cv = (cross(calib["k"], nkv, sigma), cross(calib["q"], nh, q_heads),
                          cross(calib["v"], nkv, sigma))
            R = [draw([ck[g], cq[g]], True) for g in range(nkv)]
            S = [draw([cv[g]], False) for g in range(nkv)]
        else:
            # padded: the pad dimensions already decorrelate the head's block (its share of the
            # extended rotation is not orthogonal on its own)
            R = [one(True) for _ in range(nkv)]
            S = [one(False) for _ in range(nkv)]
        scales = pad_scales.float().clone() if padded and pad_scales is not None else torch.zeros(2)
        # stored in slot order: slot j holds true KV group sigma[j]
        return HeadMixing(q_heads, sigma, torch.stack([R[g] for g in sigma.tolist()]),
                          torch.stack([S[g] for g in sigma.tolist()]), scales)

    def _pad(self, x: torch.Tensor, hd: int, scale: float | None) -> torch.Tensor:
        """(B, T, n, hd) → (B, T, n, D): zeros (scale None) or fresh secret noise of std scale."""
        w = self.width(hd)
        if w == 0:
            return x
        if scale is None:
            extra = x.new_zeros(*x.shape[:-1], w)
        else:
            assert self._pad_rng is not None
            extra = self._pad_rng.randn(*x.shape[:-1], w) * scale
            self.pad_bytes[0] += extra.numel() * 4
        return torch.cat([x, extra], dim=-1)

    # Device slots come in groups: slots j·G … j·G+G−1 all hold query heads of the true KV group in
    # KV slot j (see `sample`), so each slot's matrix applies to a (…, G, D) block by
    # broadcasting — no per-query-slot copies of the matrices.
    def conceal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hd: int):
        B, T, _ = q.shape
        nkv = len(self.k_heads)
        ks, vs = float(self.scales[0]), float(self.scales[1])
        qh = self._pad(q.view(B, T, -1, hd)[:, :, self.q_heads], hd, None)
        kh = self._pad(k.view(B, T, nkv, hd)[:, :, self.k_heads], hd, ks)
        vh = self._pad(v.view(B, T, nkv, hd)[:, :, self.k_heads], hd, vs)
        qd = qh.view(B, T, nkv, -1, qh.shape[-1]) @ self.r
        kd = kh[:, :, :, None] @ self.r
        vd = vh[:, :, :, None] @ self.s
        return qd.reshape(B, T, -1), kd.reshape(B, T, -1), vd.reshape(B, T, -1)

    def reveal(self, out: torch.Tensor, hd: int) -> torch.Tensor:
        B, T, _ = out.shape
        nkv = len(self.k_heads)
        D = int(self.r.shape[-1])
        oh = (out.view(B, T, nkv, -1, D) @ self._s_t)[..., :hd]              # · S⁻¹, pads dropped
        return oh.reshape(B, T, -1, hd)[:, :, self._q_inv].reshape(B, T, -1)  # true head order

    def fold(self, w: torch.Tensor, b: torch.Tensor | None, which: str, hd: int
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The device's copy of a q, k or v projection (out, in) [and bias] with this transform
        folded in: its output is what `conceal` would send (without padding)."""
        heads = self.q_heads if which == "q" else self.k_heads
        m = self.s if which == "v" else self.r                               # (nkv, hd, hd)
        per_slot = m.repeat_interleave(len(heads) // len(self.k_heads), dim=0)  # (n, hd, hd)
        wh = w.view(-1, hd, w.shape[1])[heads]                               # (n, hd, in)
        folded = (per_slot.transpose(1, 2) @ wh).reshape(-1, w.shape[1])     # rows: (x Wᵀ) M
        fb = None if b is None else (b.view(-1, hd)[heads][:, None] @ per_slot).reshape(-1)
        return folded.contiguous(), fb

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.q_heads, self.k_heads, self.r, self.s, self.scales))

    def wipe(self) -> None:
        for t in (self.q_heads, self.k_heads, self.r, self.s, self.scales, self._q_inv, self._s_t):
            t.zero_()


_MIXING_FIELDS = ("q_heads", "k_heads", "r", "s", "scales")


def seal_mixings(perms: list[HeadMixing]) -> dict[str, torch.Tensor]:
    """Per-layer head mixings as named tensors for a sealed file ("mix.<layer>.<field>")."""
    return {f"mix.{i}.{f}": getattr(p, f) for i, p in enumerate(perms) for f in _MIXING_FIELDS}


def unseal_mixings(t: dict[str, torch.Tensor], layers: int) -> list[HeadMixing]:
    # artifacts sealed before padding existed have no scales: no padding
    return [HeadMixing(*(t.get(f"mix.{i}.{f}", torch.zeros(2) if f == "scales" else None)
                         for f in _MIXING_FIELDS)) for i in range(layers)]


class FreshMixings:
    """Every layer's mixing for each new conversation (KV cache), drawn one conversation ahead on
    a background thread: a draw (a QR per head block: ~0.2 s for the default model's rotations,
    ~0.7 s padded) is offline work that overlaps the pause before the next prompt, not the prompt.
    `seconds` is the drawing thread's CPU time, all draws together."""

    def __init__(self, draw: Callable[[], list[HeadMixing]]) -> None:
        self._draw = draw
        self.draws = 0
        self.seconds = 0.0
        self._next: list[HeadMixing] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._start()

    def _run(self) -> None:
        t0 = time.thread_time()
        try:
            self._next = self._draw()
        except Exception as exc:          # handed to the caller of take()
            self._error = exc
        self.seconds += time.thread_time() - t0

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="veil-mixings")
        self._thread.start()

    def _wait(self) -> list[HeadMixing] | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        out, self._next = self._next, None
        return out

    def take(self) -> list[HeadMixing]:
        """This conversation's mixings (the next set starts drawing at once)."""
        out = self._wait()
        assert out is not None
        self.draws += 1
        self._start()
        return out

    def close(self) -> None:
        """Stop drawing and wipe the set drawn ahead (a failed draw left nothing to wipe)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for p in self._next or ():
            p.wipe()
        self._next = None
