"""Polynomials under CKKS: the power basis with each coefficient folded into the shallower factor,
powers by squaring, and Goldschmidt's reciprocal — the pieces Power-Softmax, polynomial
activations and the polynomial norm are made of. Each function has a plaintext twin of the same
arithmetic (`*_plain`) so the error bounds can be checked without encryption.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from veil.errors import ConfigError
from veil.he.ckks import Ct, Engine


def _split(k: int) -> tuple[int, int]:
    """x^k = x^a · x^b with b the largest power of two below k (a ≤ b)."""
    b = 1 << (k.bit_length() - 1)
    if b == k:
        return k // 2, k // 2
    return k - b, b


@lru_cache(maxsize=None)
def power_depth(k: int) -> int:
    """Levels x^k costs from x."""
    if k <= 1:
        return 0
    a, b = _split(k)
    return max(power_depth(a), power_depth(b)) + 1


def term_depth(k: int) -> int:
    """Levels c·x^k costs (the coefficient rides on the shallower factor)."""
    if k == 0:
        return 0
    if k == 1:
        return 1
    a, b = _split(k)
    return max(power_depth(a) + 1, power_depth(b)) + 1


def poly_depth(coeffs: tuple[float, ...]) -> int:
    return max((term_depth(k) for k, c in enumerate(coeffs) if c and k), default=0)


class Powers:
    """x, x², x³ … computed on demand, each once, at minimal depth."""

    def __init__(self, eng: Engine, x: Ct) -> None:
        self.eng, self.cache = eng, {1: x}

    def __call__(self, k: int) -> Ct:
        if k not in self.cache:
            a, b = _split(k)
            self.cache[k] = self.eng.mul(self(a), self(b))
        return self.cache[k]


def power(eng: Engine, x: Ct, p: int) -> Ct:
    return Powers(eng, x)(p)


def eval_poly(eng: Engine, x: Ct, coeffs: tuple[float, ...]) -> Ct:
    """Σ c_k x^k, depth `poly_depth(coeffs)`."""
    if not any(coeffs[1:]):
        raise ConfigError("a polynomial of degree 0 needs no ciphertext")
    pw = Powers(eng, x)
    terms = []
    for k, c in enumerate(coeffs):
        if k == 0 or not c:
            continue
        if k == 1:
            terms.append(eng.mul_const(x, c))
        else:
            a, b = _split(k)
            terms.append(eng.mul(eng.mul_const(pw(a), c), pw(b)))
    out = eng.add_many(terms) if len(terms) > 1 else terms[0]
    return eng.add_const(out, coeffs[0]) if coeffs[0] else out


def goldschmidt_iterations(z_min: float, tol: float = 1e-3) -> int:
    """Iterations k after which Goldschmidt's 1/z has relative error ≤ tol for every z in
    [z_min, 1]: the error is (1 − z)^(2^k)."""
    if not 0 < z_min <= 1:
        raise ConfigError(f"Goldschmidt needs its input in (0, 1]; the lower bound is {z_min}")
    if z_min == 1:
        return 1
    return max(1, math.ceil(math.log2(math.log(tol) / math.log(1 - z_min))))


def goldschmidt_plain(z: np.ndarray, k: int) -> np.ndarray:
    e = 1 - z
    a = 1 + e
    for _ in range(1, k):
        e = e * e
        a = a * (1 + e)
    return a


def goldschmidt(eng: Engine, z: Ct, k: int) -> Ct:
    """≈ 1/z for z in (0, 1], depth k: a₀ = 2 − z, eᵢ = eᵢ₋₁², aᵢ = aᵢ₋₁(1 + eᵢ)."""
    e = eng.add_const(eng.neg(z), 1.0)
    a = eng.add_const(e, 1.0)
    for _ in range(1, k):
        e = eng.mul(e, e)
        a = eng.mul(a, eng.add_const(e, 1.0))
    return a
