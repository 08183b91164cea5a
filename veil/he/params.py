"""CKKS parameter sets, and the 128-bit security rule.

SEAL's `CoeffModulus.MaxBitCount(N, tc128)` (the HomomorphicEncryption.org standard for a ternary
secret) bounds the total coefficient-modulus bits per ring degree N. A set above that bound is
refused unless insecure parameters were explicitly allowed (`VEIL_HE_ALLOW_INSECURE=1`: the test
suite, to run small rings in seconds) — and then every result it produces is labelled insecure.

Each set's chain is [q0, Δ-bit primes …, special prime]: q0 holds the decrypted value (|x|·2^Δ <
q0/2, so |x| < 2^(q0−Δ−1)), each middle prime is one multiplicative level, the special prime only
serves key switching.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from veil.errors import ConfigError

# SEAL's 128-bit bound on the total coefficient-modulus bits per poly degree (seal/util/hestdparms.h)
MAX_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
INSECURE_ENV = "VEIL_HE_ALLOW_INSECURE"


@dataclass(frozen=True)
class CkksParams:
    name: str
    poly_degree: int
    bits: tuple[int, ...]      # q0, the level primes, the special (key-switching) prime
    scale_bits: int

    @property
    def levels(self) -> int:
        """Multiplicative levels: rescales a fresh ciphertext can take before q0 alone is left."""
        return len(self.bits) - 2

    @property
    def slots(self) -> int:
        return self.poly_degree // 2

    @property
    def total_bits(self) -> int:
        return sum(self.bits)

    @property
    def secure(self) -> bool:
        return self.total_bits <= MAX_BITS_128.get(self.poly_degree, 0)

    @property
    def headroom(self) -> float:
        """The largest |value| q0 decrypts correctly (with a factor 2 of margin)."""
        return 2.0 ** (self.bits[0] - self.scale_bits - 2)

    def check(self) -> None:
        """Refuse a set below 128-bit security unless insecure sets were allowed for tests."""
        if self.poly_degree not in MAX_BITS_128:
            raise ConfigError(f"CKKS: poly degree {self.poly_degree} is not one of "
                              f"{sorted(MAX_BITS_128)}")
        if any(b > 60 or b < 20 for b in self.bits):
            raise ConfigError(f"CKKS set {self.name}: primes must have 20–60 bits, got {self.bits}")
        if not self.secure and os.environ.get(INSECURE_ENV) != "1":
            raise ConfigError(
                f"CKKS set {self.name}: {self.total_bits} coefficient-modulus bits at N="
                f"{self.poly_degree} is below 128-bit security (the bound is "
                f"{MAX_BITS_128[self.poly_degree]}); veil refuses it (tests may allow it with "
                f"{INSECURE_ENV}=1)")


def _set(name: str, n: int, levels: int, scale: int = 36, q0: int = 50, special: int = 60
         ) -> CkksParams:
    return CkksParams(name, n, (q0,) + (scale,) * levels + (special,), scale)


# 128-bit sets, each with as many 36-bit levels as its bound allows (50-bit q0, 60-bit special prime: key-switching noise stays below the 36-bit scale)
PARAM_SETS: dict[str, CkksParams] = {p.name: p for p in (
    _set("n8192", 8192, 3),        # 218 of 218 bits
    _set("n16384", 16384, 9),      # 434 of 438
    _set("n32768", 32768, 21),     # 866 of 881
    # below 128 bits: tests only (small rings, seconds); results carry `secure: false`
    _set("test-n4096", 4096, 10, scale=30, q0=40),
    _set("test-n8192", 8192, 10, scale=33, q0=45),
)}
SECURE_SETS = tuple(p for p in PARAM_SETS.values() if p.secure)


def get(name: str) -> CkksParams:
    if name not in PARAM_SETS:
        raise ConfigError(f"unknown CKKS parameter set {name!r} (known: {', '.join(PARAM_SETS)})")
    params = PARAM_SETS[name]
    params.check()
    return params


def smallest_for(depth: int, slots_needed: int = 0) -> CkksParams:
    """The smallest 128-bit set with at least `depth` levels and `slots_needed` slots."""
    for p in SECURE_SETS:
        if p.levels >= depth and p.slots >= slots_needed:
            return p
    raise ConfigError(f"no 128-bit CKKS set has {depth} levels and {slots_needed} slots "
                      f"(deepest: {SECURE_SETS[-1].levels} levels)")
