"""How a (tokens × features) activation sits in CKKS slots, and the diagonals of a plaintext
weight in that layout.

Feature-major packing: features are cut into chunks of C (one ciphertext each); inside a chunk,
feature j of token t sits in slot j·T + t, T the session's token period (a power of two ≥ every
sequence it runs). The C·T block is tiled `reps` times to fill the slots, so a rotation by k·T
moves every feature by k positions cyclically within its chunk — the property the diagonal method
needs — and a rotation by −r moves every token r positions later (what the attention's diagonals
use; slots that wrap in from the previous feature land on t < r, which the causal mask zeroes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from veil.errors import ConfigError


def pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@dataclass(frozen=True)
class Layout:
    T: int          # token period
    C: int          # features per ciphertext
    slots: int

    def __post_init__(self) -> None:
        if self.T & (self.T - 1) or self.C & (self.C - 1) or self.C * self.T > self.slots:
            raise ConfigError(f"layout: T={self.T} and C={self.C} must be powers of two with "
                              f"C·T ≤ {self.slots} slots")

    @property
    def reps(self) -> int:
        return self.slots // (self.C * self.T)

    def chunks(self, width: int) -> int:
        return -(-width // self.C)

    def _tile(self, block: np.ndarray) -> np.ndarray:
        """(C, T) → one slot vector."""
        return np.tile(block.reshape(-1), self.reps)

    def pack(self, x: np.ndarray) -> list[np.ndarray]:
        """(n, width) → one slot vector per chunk (tokens n..T−1 and padded features are 0)."""
        n, width = x.shape
        if n > self.T:
            raise ConfigError(f"{n} tokens exceed the layout's period T={self.T}")
        out = []
        for c in range(self.chunks(width)):
            block = np.zeros((self.C, self.T))
            part = x[:, c * self.C:(c + 1) * self.C]
            block[:part.shape[1], :n] = part.T
            out.append(self._tile(block))
        return out

    def unpack(self, vecs: list[np.ndarray], n: int, width: int) -> np.ndarray:
        """The inverse of `pack` (read from the first tile)."""
        cols = [np.asarray(v)[:self.C * self.T].reshape(self.C, self.T)[:, :n].T for v in vecs]
        return np.concatenate(cols, axis=1)[:, :width]

    def per_feature(self, f: np.ndarray) -> list[np.ndarray]:
        """A per-feature value (width,) broadcast over tokens."""
        return self.per_slot(np.broadcast_to(np.asarray(f, dtype=np.float64)[:, None],
                                             (len(f), self.T)))

    def per_slot(self, m: np.ndarray) -> list[np.ndarray]:
        """A (width, T) table of per-(feature, token) values."""
        width = m.shape[0]
        out = []
        for c in range(self.chunks(width)):
            block = np.zeros((self.C, self.T))
            part = m[c * self.C:(c + 1) * self.C]
            block[:part.shape[0]] = part
            out.append(self._tile(block))
        return out

    def per_token(self, g: np.ndarray) -> np.ndarray:
        """A per-token value (T,), the same for every feature: one vector for every chunk."""
        return self._tile(np.broadcast_to(np.asarray(g, dtype=np.float64)[None, :],
                                          (self.C, self.T)))


def rot(v: np.ndarray, step: int) -> np.ndarray:
    """The plaintext twin of a ciphertext rotation: out[m] = v[m + step]."""
    return np.roll(v, -step)


@dataclass
class Enc:
    """An encrypted activation: one ciphertext per feature chunk, plus a pending per-slot affine
    map (out = x·scale + bias, one vector per chunk) that the next linear folds into its
    diagonals for free — how affine norms, the norm's weight and attention's 1/L factor cost no
    level. `roped`: the rotary embedding is already applied (folded into the q/k diagonals)."""

    cts: list[Any]
    width: int
    scale: list[np.ndarray] | None = None
    bias: list[np.ndarray] | None = None
    roped: bool = False
    meta: dict = field(default_factory=dict)


def diagonals(W: np.ndarray, lay: Layout, o: int, i: int) -> np.ndarray:
    """(C, C) the generalised diagonals of block (o, i) of W (out, in): D[k, j] =
    W[o·C + j, i·C + (j + k) mod C] — what multiplies feature j of rot(x_i, k·T) in output chunk o
    (`spread` lays a row out over the slots)."""
    C = lay.C
    block = np.zeros((C, C))
    part = W[o * C:(o + 1) * C, i * C:(i + 1) * C]
    block[:part.shape[0], :part.shape[1]] = part
    j = np.arange(C)
    return block[j[None, :], (j[None, :] + j[:, None]) % C]             # (k, j)


def spread(D: np.ndarray, lay: Layout) -> np.ndarray:
    """(..., C) per-feature rows → (..., slots): feature j at every slot j·T + t of every tile."""
    lead = D.shape[:-1]
    return np.tile(np.repeat(D, lay.T, axis=-1), (1,) * len(lead) + (lay.reps,))
