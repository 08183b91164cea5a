"""Secret randomness: every secret draw in veil comes from one keyed CSPRNG construction.

Threat model: the attacker sees outputs derived from secret draws (masked weights, padded
activations, permuted heads, Freivalds checks) and wants the draws themselves. A seeded PRNG —
torch's or numpy's Mersenne Twister, numpy's PCG64 — is the wrong tool:
  - its seed caps security: a torch generator takes a 63-bit seed, so a LoRO factor bank drawn
    from one seeded with random bits is at most 63 bits hard, whatever its size;
  - Mersenne Twister is not cryptographic: 624 consecutive 32-bit outputs give away its whole state
    (it is linear over GF(2)), so whoever recovers a few of the draws predicts the rest;
  - the module-level generators of torch and numpy are process state that any library or
    caller may reset to a known value.
So secrets come from AES-256 in counter mode under a 256-bit key from the OS CSPRNG: a PRF whose
outputs reveal nothing about each other or the key.

Construction:
  - `Keystream(key)`: AES-256 of 16-byte counter blocks, computed as AES-ECB of the blocks with
    one long-lived cipher context (CTR mode itself needs a new context per starting counter, which
    costs more than a small draw). Keystream bytes are read as native uint32 words.
  - Gaussians by Box–Muller: float32 from 24-bit uniforms (two words per pair; what LoRO's pads
    use on the decode hot path), float64 from 53-bit uniforms (two 64-bit words per pair).
  - `SecretRng(key)`: a sequential stream over a `Keystream`; every draw takes the next unused
    counter blocks, so no block is ever encrypted twice. Integers are unbiased (rejection
    sampling), permutations uniform (Fisher–Yates over unbiased draws).

Counter-block layouts (16 bytes, big-endian), so that one key could serve both without overlap:
  PadStream (veil/tee/pads.py)   epoch u32 | group u32 | block index u64    group < 0xFFFFFFFF
  SecretRng                      0xFFFFFFFF | 0xFFFFFFFF | block index u64
A pad's group field is the index of a linear group (hundreds at most), never 0xFFFFFFFF, so the
two streams never share a block. (Each still draws its own key today; the layout makes key reuse
harmless, not a thing to do.)
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32
RNG_PREFIX = 0xFFFF_FFFF_FFFF_FFFF      # first 8 bytes of every SecretRng counter block

_F32_2PI_24 = np.float32(2 * math.pi * 2.0 ** -24)
_F64_2PI_53 = 2 * math.pi * 2.0 ** -53


def new_key() -> bytes:
    """A fresh 256-bit key from the OS CSPRNG."""
    return os.urandom(KEY_BYTES)


class Keystream:
    """AES-256 of counter blocks under one key (see the module docstring)."""

    def __init__(self, key: bytes | None = None) -> None:
        key = new_key() if key is None else key
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            got = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
            raise ValueError(f"a keystream key is {KEY_BYTES} bytes (256 bits), got {got}")
        self._ecb = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor()

    def words(self, blocks: np.ndarray) -> np.ndarray:
        """Counter blocks ((n, 2) big-endian uint64, dtype '>u8') → their keystream, 4n uint32."""
        return np.frombuffer(self._ecb.update(blocks.tobytes()), dtype=np.uint32)


def gaussian_f32(words: np.ndarray) -> np.ndarray:
    """Unit Gaussians, float32, one per uint32 word (an even number of them).

    Box–Muller on 24-bit uniforms in float32 (numpy's float64 trig is ~4× slower); word pairs
    (2m, 2m+1) → values (2m, 2m+1). u1 is in (0, 1] (top + 0.5 may round up to 2^24 for the
    largest words: then r = 0, finite), so the log is finite."""
    top = (words >> 8).astype(np.float32)
    r = np.sqrt(np.float32(-2.0) * np.log((top[0::2] + np.float32(0.5)) * np.float32(2.0 ** -24)))
    theta = top[1::2] * _F32_2PI_24
    z = np.empty_like(top)
    np.multiply(r, np.cos(theta), out=z[0::2])
    np.multiply(r, np.sin(theta), out=z[1::2])
    return z


def gaussian_f64(words: np.ndarray) -> np.ndarray:
    """Unit Gaussians, float64, one per pair of uint32 words (a multiple of four of them).

    Box–Muller on 53-bit uniforms: each 64-bit word gives one; u1 = (top + 0.5)·2^-53 lies in
    (0, 1] (rounding as in `gaussian_f32`), so the log is finite, and the tails reach ~8.6σ where
    24 bits stop at ~5.8σ."""
    top = (words.view(np.uint64) >> np.uint64(11)).astype(np.float64)
    r = np.sqrt(-2.0 * np.log((top[0::2] + 0.5) * 2.0 ** -53))
    theta = top[1::2] * _F64_2PI_53
    z = np.empty_like(top)
    np.multiply(r, np.cos(theta), out=z[0::2])
    np.multiply(r, np.sin(theta), out=z[1::2])
    return z


def _dims(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


class SecretRng:
    """A stream of secret random values: AES-256-CTR under `key` (a fresh OS key when None).

    The same key gives the same sequence of draws (tests use a fixed key for reproducibility);
    each draw consumes the next counter blocks, so draws never repeat keystream."""

    def __init__(self, key: bytes | None = None) -> None:
        self._keystream = Keystream(key)
        self._counter = 0           # next unused block index (u64: never wraps in practice)

    def _words(self, n: int) -> np.ndarray:
        """The next n keystream words (uint32), from ⌈n/4⌉ fresh blocks."""
        nblocks = (n + 3) // 4
        blocks = np.empty((nblocks, 2), dtype=">u8")
        blocks[:, 0] = RNG_PREFIX
        blocks[:, 1] = np.arange(self._counter, self._counter + nblocks, dtype=np.uint64)
        self._counter += nblocks
        return self._keystream.words(blocks)[:n]

    def _u64(self, n: int) -> np.ndarray:
        return self._words(2 * n).view(np.uint64)

    def randn(self, *shape: int | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Unit Gaussians of `shape`, float32 (24-bit uniforms) or float64 (53-bit uniforms)."""
        # randn(2, 3) and randn((2, 3)) alike, as torch accepts both
        dims = _dims(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else _dims(shape)
        n = math.prod(dims)
        pairs = (n + 1) // 2
        if dtype == torch.float32:
            z = gaussian_f32(self._words(2 * pairs))
        elif dtype == torch.float64:
            z = gaussian_f64(self._words(4 * pairs))
        else:
            raise ValueError(f"randn draws float32 or float64, not {dtype}")
        return torch.from_numpy(z[:n]).view(dims)

    def uniform(self, shape: int | Sequence[int], low: float = 0.0, high: float = 1.0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform in [low, high) (53-bit uniforms; a float32 result may round up to `high`)."""
        if not high > low:
            raise ValueError(f"uniform needs low < high, got [{low}, {high})")
        dims = _dims(shape)
        u = (self._u64(math.prod(dims)) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
        return torch.from_numpy(low + (high - low) * u).view(dims).to(dtype)

    def randbelow(self, n: int) -> int:
        """Uniform in range(n): `bits` random bits, redrawn while ≥ n (unbiased; < 2 tries on
        average)."""
        if n < 1:
            raise ValueError(f"randbelow needs n ≥ 1, got {n}")
        bits = (n - 1).bit_length()
        if bits == 0:
            return 0
        nwords = (bits + 31) // 32
        while True:
            v = int.from_bytes(self._words(nwords).tobytes(), "little") >> (32 * nwords - bits)
            if v < n:
                return v

    def _below(self, bounds: np.ndarray) -> np.ndarray:
        """One unbiased draw in range(b) per bound b (1 ≤ b ≤ 2^32), vectorised: a 32-bit word is
        accepted when below the largest multiple of b that fits in 2^32, and taken mod b; the
        rejected few are redrawn."""
        bounds = bounds.astype(np.uint64)
        limit = np.uint64(1 << 32) - (np.uint64(1 << 32) % bounds)
        out = np.empty(len(bounds), dtype=np.uint64)
        todo = np.arange(len(bounds))
        while len(todo):
            w = self._words(len(todo)).astype(np.uint64)
            ok = w < limit[todo]
            out[todo[ok]] = w[ok] % bounds[todo[ok]]
            todo = todo[~ok]
        return out

    def randint(self, low: int, high: int, shape: int | Sequence[int]) -> torch.Tensor:
        """Uniform integers in [low, high) of `shape` (int64); high − low ≤ 2^32."""
        span = high - low
        if not 1 <= span <= 1 << 32:
            raise ValueError(f"randint needs 1 ≤ high − low ≤ 2^32, got [{low}, {high})")
        dims = _dims(shape)
        v = self._below(np.full(math.prod(dims), span, dtype=np.uint64)).astype(np.int64)
        return torch.from_numpy(v + low).view(dims)

    def perm(self, n: int) -> torch.Tensor:
        """A uniformly random permutation of range(n) (int64): Fisher–Yates, its n − 1 unbiased
        draws made in one vectorised batch, then the swaps."""
        if not 0 <= n <= 1 << 32:
            raise ValueError(f"perm needs 0 ≤ n ≤ 2^32, got {n}")
        js = self._below(np.arange(n, 1, -1, dtype=np.uint64)).tolist()  # j_i in range(i+1), i = n−1 … 1
        p = list(range(n))
        for i, j in zip(range(n - 1, 0, -1), js):
            p[i], p[j] = p[j], p[i]
        return torch.tensor(p, dtype=torch.long)

    def sign(self) -> float:
        """+1.0 or −1.0, each with probability ½."""
        return 1.0 if int(self._words(1)[0]) & 1 else -1.0
