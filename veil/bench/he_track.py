"""Ciphertexts that carry a public factor, and refresh when their levels run out: the arithmetic
the HE softmax benchmark's contenders are written in, over either the CKKS `Engine` or
`PlainEngine` (numpy: the plaintext twin, and the level/refresh plan without encryption).

Why a factor: `Engine.mul` relabels the rescaled scale Δ²/p_l as Δ, which multiplies the value by
Δ/p_l — 1 + 1e-5 … 2.5e-4 for the 36-bit primes of n16384/n32768. One product shrugs that off,
but the softmax baselines square 15 times in a row (exp ≈ (1 + x/2^15)^(2^15), Goldschmidt's
e_i = e_{i-1}²), and a chain of n squarings raises the first drift to the 2^(n−1): e^4 at n32768.
So every value carries its public factor f (decrypted = f · true value), and:
  * a plaintext multiplier absorbs it (the product leaves with whatever factor the caller asks);
  * a constant added is scaled by it, and only values of equal factor are added;
  * a squaring chain starts at the factor α that cancels its drifts (`chain_alpha`), so its
    intermediate factors stay ≈ 1 and none of its values outgrows the decryption headroom;
  * a refresh (the client decrypts and re-encrypts) resets it to any factor the caller asks;
  * the last one is a public scalar the client divides out (in a full forward it rides on the
    next plaintext product, as the HE executor's pending scales do).
`Engine` has none of this (veil/he is another component's); it is built here on its public API.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from veil.errors import ConfigError


@dataclass
class PlainCt:
    """A plaintext stand-in for a ciphertext: its slots and its level."""

    v: np.ndarray
    lvl: int


class PlainEngine:
    """The `Engine` operations the contenders use, on float64 slot vectors: the same level rule
    (a product needs a level and costs one; sums meet at the lower level), no noise, no drift.
    `count` tallies the ciphertext operations a real run would make."""

    def __init__(self, levels: int, slots: int) -> None:
        self.levels, self.slots = levels, slots
        self.count: Counter = Counter()

    def level(self, ct: PlainCt) -> int:
        return ct.lvl

    def encrypt(self, vec: np.ndarray) -> PlainCt:
        vec = np.asarray(vec, dtype=np.float64).ravel()
        if vec.size > self.slots:
            raise ConfigError(f"{vec.size} values do not fit {self.slots} slots")
        v = np.zeros(self.slots)
        v[:vec.size] = vec
        return PlainCt(v, self.levels)

    def decrypt(self, ct: PlainCt) -> np.ndarray:
        return ct.v.copy()

    def _down(self, lvl: int, what: str) -> int:
        if lvl < 1:
            raise ConfigError(f"{what}: the ciphertext has no level left (the depth plan is wrong)")
        return lvl - 1

    def mul(self, a: PlainCt, b: PlainCt) -> PlainCt:
        self.count["ct_mul"] += 1
        return PlainCt(a.v * b.v, self._down(min(a.lvl, b.lvl), "ciphertext product"))

    def mul_plain(self, ct: PlainCt, vec: np.ndarray) -> PlainCt:
        self.count["pt_mul"] += 1
        return PlainCt(ct.v * np.asarray(vec, dtype=np.float64),
                       self._down(ct.lvl, "plaintext product"))

    def mul_const(self, ct: PlainCt, c: float) -> PlainCt:
        return self.mul_plain(ct, np.full(self.slots, c))

    def add(self, a: PlainCt, b: PlainCt) -> PlainCt:
        self.count["add"] += 1
        return PlainCt(a.v + b.v, min(a.lvl, b.lvl))

    def add_const(self, ct: PlainCt, c: float) -> PlainCt:
        self.count["add"] += 1
        return PlainCt(ct.v + c, ct.lvl)

    def neg(self, ct: PlainCt) -> PlainCt:
        return PlainCt(-ct.v, ct.lvl)

    def rotate(self, ct: PlainCt, step: int) -> PlainCt:
        self.count["rotate"] += 1
        return PlainCt(np.roll(ct.v, -step), ct.lvl)


def drift_table(eng) -> dict[int, float]:
    """Δ/p_l per level l ≥ 1: the factor a ct×ct product rescaled at level l leaves on its value
    (1.0 everywhere for `PlainEngine`). Read from the SEAL context's modulus chain."""
    if isinstance(eng, PlainEngine):
        return {lvl: 1.0 for lvl in range(eng.levels + 1)}
    out = {}
    data = eng.ctx.first_context_data()
    while data is not None:
        out[data.chain_index()] = eng.scale / float(data.parms().coeff_modulus()[-1].value())
        data = data.next_context_data()
    return out


@dataclass
class T:
    """A ciphertext (or its plaintext stand-in) and its public factor: decrypted = f · value."""

    ct: object
    f: float


class Ops:
    """Factor-tracked arithmetic and refreshes over one engine (see the module docstring).

    A refresh is the client round trip SEAL needs in place of bootstrapping: decrypt, re-encrypt
    at the top level. It is counted, and timed as its decrypt + encrypt."""

    def __init__(self, eng) -> None:
        self.eng = eng
        self.top = eng.params.levels if hasattr(eng, "params") else eng.levels
        self.drift = drift_table(eng)
        self.refreshes = 0
        self.refresh_s = 0.0

    # ---- client side ------------------------------------------------------------------------
    def encrypt(self, vec: np.ndarray) -> T:
        return T(self.eng.encrypt(vec), 1.0)

    def decrypt(self, t: T) -> np.ndarray:
        return self.eng.decrypt(t.ct) / t.f

    def refresh(self, t: T, f: float = 1.0) -> T:
        t0 = time.perf_counter()
        vec = self.eng.decrypt(t.ct) * (f / t.f)
        out = T(self.eng.encrypt(vec), f)
        self.refresh_s += time.perf_counter() - t0
        self.refreshes += 1
        return out

    # ---- server side ------------------------------------------------------------------------
    def level(self, t: T) -> int:
        return self.eng.level(t.ct)

    def ensure(self, t: T, need: int, f: float = 1.0) -> T:
        """`t` with at least `need` levels: refreshed (to factor f) when it has fewer."""
        if need > self.top:
            raise ConfigError(f"an operation needs {need} levels; the parameter set has "
                              f"{self.top}")
        return t if self.level(t) >= need else self.refresh(t, f)

    def mul(self, a: T, b: T) -> T:
        lvl = min(self.level(a), self.level(b))
        out = self.eng.mul(a.ct, b.ct)
        return T(out, a.f * b.f * self.drift[lvl])

    def square(self, a: T) -> T:
        return self.mul(a, a)

    def mul_plain(self, t: T, vec: np.ndarray, f: float = 1.0) -> T:
        """vec ⊙ value, leaving with factor f (one level, exact: no drift)."""
        return T(self.eng.mul_plain(t.ct, np.asarray(vec, dtype=np.float64) * (f / t.f)), f)

    def mul_const(self, t: T, c: float, f: float = 1.0) -> T:
        return T(self.eng.mul_const(t.ct, c * f / t.f), f)

    def add(self, a: T, b: T) -> T:
        if not math.isclose(a.f, b.f, rel_tol=1e-9):
            raise ConfigError(f"adding values of different public factors ({a.f!r}, {b.f!r})")
        return T(self.eng.add(a.ct, b.ct), a.f)

    def add_const(self, t: T, c: float) -> T:
        return T(self.eng.add_const(t.ct, c * t.f), t.f)

    def neg(self, t: T) -> T:
        return T(self.eng.neg(t.ct), t.f)

    def rotate(self, t: T, step: int) -> T:
        return T(self.eng.rotate(t.ct, step), t.f)

    # ---- chains -----------------------------------------------------------------------------
    def chain_alpha(self, level: int, n: int) -> float:
        """The starting factor that brings a chain of min(n, level) squarings, the first
        rescaled at `level`, out at factor 1: x_{j+1} = x_j²·d_j, so α = Π d_j^(−2^(−1−j))."""
        n = min(n, level)
        return math.exp(-sum(math.log(self.drift[level - j]) / 2 ** (j + 1) for j in range(n)))

    def squarings(self, t: T, n: int) -> T:
        """t^(2^n) by n squarings; when the levels run out mid-chain, a refresh restarts the rest
        at the top with its own pre-compensating factor."""
        for done in range(n):
            if self.level(t) < 1:
                t = self.refresh(t, self.chain_alpha(self.top, n - done))
            t = self.square(t)
        return t

    def goldschmidt(self, z: T, k: int, reserve: int = 1) -> T:
        """≈ 1/z for z ∈ (0, 1] by k Goldschmidt iterations (a₀ = 2 − z, eᵢ = eᵢ₋₁²,
        aᵢ = aᵢ₋₁(1 + eᵢ); relative error (1 − z)^(2^k)), depth k (0 for k = 1), the same
        arithmetic as veil.he.poly.goldschmidt. z's factor should be `chain_alpha` of the e
        chain; when the chain outruns the set, (a, e) are refreshed together and the result
        keeps `reserve` levels where the set allows."""
        e = self.add_const(self.neg(z), 1.0)
        a = self.add_const(e, 1.0)
        for i in range(1, k):
            after = min(self.level(a), self.level(e) - 1) - 1     # a's level after this step
            if self.level(e) < 1 or after < 0:
                a = self.refresh(a)
                e = self.refresh(e, self.chain_alpha(self.top, k - i))
            e = self.square(e)
            a = self.mul(a, self.add_const(e, 1.0))
        return a

    def row_sum(self, t: T, stride: int, length: int) -> T:
        """Σ over each row in every slot of it, rows strided (slot j·stride + row; stride ×
        length = all slots): log2(length) rotate-and-adds, no level, no mask."""
        step = stride
        while step < stride * length:
            t = self.add(t, self.rotate(t, step))
            step *= 2
        return t
