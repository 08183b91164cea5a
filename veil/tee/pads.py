"""LoRO's one-time pads: made offline in the enclave, their products kept sealed on the device.

A fresh pad g (one Gaussian row per input row and linear group) needs its product g·W'ᵀ for each
matrix of the group — out floats per row, ~0.8 MiB per token for the default model in float32, far more than
a TEE's secure memory should hold for a whole conversation. So (`fresh`, the default):

- The pads themselves are never stored: row i of group k is AES-256-CTR keystream (key K_pad,
  counter block = epoch | k | i·stride) turned Gaussian by Box–Muller. The enclave regenerates a
  row when it needs it; nothing about it exists outside the enclave.
- Offline (`refill`, before a generation) the enclave makes each row's products g·W'ᵀ (float32
  by default; float64 halves their rounding at twice the bytes)
  and seals each (matrix, row) with AES-256-GCM under K_seal, nonce = epoch | matrix | row, then
  stores the ciphertexts on the device (op `stash`). The nonce binds every blob to its place:
  a device that returns another row, another matrix's row, an older epoch's row or altered bytes
  fails the tag → `IntegrityError`.
- Online the products travel with the linear request that uses them (`fetch` on op `linear`): the
  device returns them next to ỹ in the same reply, so the store costs no extra round trip; the
  enclave opens them only to subtract s·(g·W'ᵀ).

Both keys are drawn from the OS CSPRNG per pool and never leave the enclave; a new epoch per
refill means a pad row is never reused. `fixed` mode (one pad per group, reused — the public
code's setting, kept for the attacks) holds its few rows in the enclave.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.csprng import Keystream, gaussian_f32, new_key
from veil.errors import IntegrityError

STORE_PREFIX = "pads."      # device tensor holding matrix n's sealed product rows: "pads.<n>"
_TAG = 16
_AAD = b"veil/loro/pad-product"
_CHUNK_ROWS = 64            # offline work in chunks: the enclave never holds a whole pool


@dataclass
class PadCost:
    rows: int = 0           # rows made (offline)
    flops: int = 0
    seconds: float = 0.0
    stored_bytes: int = 0   # sealed products put on the device (offline traffic)
    used_bytes: int = 0     # sealed products fetched back online (already in the channel bytes)
    crypto_bytes: int = 0   # online AES work on the critical path: the pads' keystream
    overlap_crypto_bytes: int = 0   # sealed products opened, while the device multiplies


class PadStream:
    """Unit Gaussian pad rows from AES-CTR keystream (veil/csprng.py's `Keystream` and float32
    Box–Muller): row i of group k is a pure function of (key, epoch, k, i), so it is regenerated
    instead of stored. Counter block: epoch u32 | group u32 | block index u64 (group indices stay
    far below 0xFFFFFFFF, the value `SecretRng` reserves)."""

    def __init__(self) -> None:
        self.keystream = Keystream()

    @staticmethod
    def stride(dim: Any) -> Any:
        """16-byte counter blocks per row: two 32-bit words per pair of Gaussians (an int, or
        element-wise for an integer array)."""
        return (8 * ((dim + 1) // 2) + 15) // 16

    def segments(self, epoch: int, groups: np.ndarray, starts: np.ndarray, n: int,
                 dims: np.ndarray) -> list[torch.Tensor]:
        """Rows starts[j] … starts[j]+n−1 of group groups[j] (dims[j] wide), for every j, from one
        keystream call and one Box–Muller pass (per-call overhead, not arithmetic, is what a
        decode step's ~120 single rows would otherwise cost)."""
        strides = self.stride(dims)
        nblocks = strides * n
        seg = np.repeat(np.arange(len(groups)), nblocks)
        first = np.cumsum(nblocks) - nblocks
        blocks = np.empty((int(nblocks.sum()), 2), dtype=">u8")   # counter block: epoch|group|index
        blocks[:, 0] = (np.int64(epoch) << 32) | groups[seg]
        blocks[:, 1] = (starts * strides)[seg] + np.arange(len(seg)) - first[seg]
        zt = torch.from_numpy(gaussian_f32(self.keystream.words(blocks)))
        bounds = zip((first * 4).tolist(), (strides * 4).tolist(), dims.tolist())
        return [zt[a:a + n * w].view(n, w)[:, :d] for a, w, d in bounds]

    def rows(self, epoch: int, group: int, start: int, n: int, dim: int) -> torch.Tensor:
        """Rows start … start+n−1 of one group (unit Gaussian, float32, (n, dim))."""
        return self.segments(epoch, np.array([group]), np.array([start]), n, np.array([dim]))[0]


class PadPool:
    """Pads for every linear group, and their products g·W'ᵀ.

    `take(group, rows)` hands out the next unused pad rows and a ticket; `products(name, ticket,
    fetched)` returns the matching g·W'ᵀ rows (`dtype`: float32 by default, or float64) —
    opened from the sealed blobs the device sent back (`fresh`) or from enclave memory (`fixed`)."""

    def __init__(self, groups: dict[str, tuple[str, ...]], mode: str,
                 weight_of: Callable[[str], torch.Tensor],
                 stash: Callable[[list[str], int, int, list[torch.Tensor]], None] | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"pad products are float32 or float64, not {dtype}")
        self.groups, self.mode, self.weight_of, self.stash = groups, mode, weight_of, stash
        self.dtype = dtype
        self.group_index = {g: i for i, g in enumerate(groups)}
        self.matrix_index = {n: i for i, n in enumerate(n for names in groups.values() for n in names)}
        self.in_dim = {g: weight_of(names[0]).shape[1] for g, names in groups.items()}
        self.cost = PadCost()
        self.stream = PadStream()
        self.aead = AESGCM(new_key())
        self.epoch = 0
        self.capacity = 0
        self.cursor = {g: 0 for g in groups}
        self._ids = np.arange(len(groups), dtype=np.int64)
        self._dims = np.array([self.in_dim[g] for g in groups], dtype=np.int64)
        self._next: dict[str, tuple[int, torch.Tensor]] = {}  # one step's rows, made together
        self.pads: dict[str, torch.Tensor] = {}          # fixed mode only
        self.fixed_products: dict[str, torch.Tensor] = {}
        if mode == "fixed":
            self.refill(1)
        elif stash is None:
            raise ValueError("fresh pads need a device store (stash)")

    def _nonce(self, name: str, row: int) -> bytes:
        return struct.pack("<III", self.epoch, self.matrix_index[name], row)

    def refill(self, rows: int) -> None:
        """Offline: a new epoch of `rows` pad rows per group, products sealed onto the device."""
        t0 = time.perf_counter()
        self.epoch += 1
        for g, names in self.groups.items():
            weights = [self.weight_of(n).to(self.dtype) for n in names]
            for start in range(0, rows, _CHUNK_ROWS):
                n = min(_CHUNK_ROWS, rows - start)
                pad = self.stream.rows(self.epoch, self.group_index[g], start, n, self.in_dim[g])
                blobs = []
                for name, w in zip(names, weights):
                    # in the products' dtype: float32 rounds like the device's own ỹ (the
                    # cancellation's error about doubles; measured in benchmarks/results/tee.md),
                    # float64 adds none of its own but doubles the bytes stored, moved and opened
                    prod = pad.to(self.dtype) @ w.t()                          # (n, out)
                    self.cost.flops += 2 * n * w.numel()
                    if self.mode == "fixed":
                        self.pads[g], self.fixed_products[name] = pad, prod
                        continue
                    raw = prod.numpy()
                    sealed = [self.aead.encrypt(self._nonce(name, start + i), raw[i].tobytes(), _AAD)
                              for i in range(n)]
                    blobs.append(torch.frombuffer(bytearray(b"".join(sealed)), dtype=torch.uint8)
                                 .view(n, -1))
                if blobs:
                    assert self.stash is not None
                    self.stash([STORE_PREFIX + name for name in names], start, rows, blobs)
                    self.cost.stored_bytes += sum(b.numel() for b in blobs)
        self.cost.rows += rows
        self.capacity = rows
        self.cursor = {g: 0 for g in self.groups}
        self._next = {}
        self.cost.seconds += time.perf_counter() - t0

    def take(self, group: str, rows: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """The next `rows` unit pad rows of `group` (float32) and their ticket (start, rows)."""
        if self.mode == "fixed":
            return self.pads[group].expand(rows, -1), (0, rows)
        start = self.cursor[group]
        if start + rows > self.capacity:
            self.refill(max(rows, self.capacity))   # (outside a planned generation: more rows)
            start = 0
        made = self._next.pop(group, None)
        if made is not None and made[0] == start and made[1].shape[0] == rows:
            pad = made[1]
        elif rows > 4 or any(c + rows > self.capacity for c in self.cursor.values()):
            # prefill: many rows of one group at a time (a step's worth for all groups is large)
            pad = self.stream.rows(self.epoch, self.group_index[group], start, rows, self.in_dim[group])
        else:
            # decode: the next `rows` rows of every group in one pass, kept until each is taken
            starts = np.fromiter(self.cursor.values(), dtype=np.int64, count=len(self.cursor))
            made_all = self.stream.segments(self.epoch, self._ids, starts, rows, self._dims)
            self._next = {g: (int(starts[i]), made_all[i]) for i, g in enumerate(self.groups) if g != group}
            pad = made_all[self.group_index[group]]
        self.cursor[group] = start + rows
        self.cost.crypto_bytes += rows * PadStream.stride(self.in_dim[group]) * 16
        return pad, (start, rows)

    def fetch_args(self, ticket: tuple[int, int]) -> dict:
        """Request arguments asking the device to send the ticket's sealed products back."""
        return {} if self.mode == "fixed" else {"fetch": list(ticket)}

    def products(self, name: str, ticket: tuple[int, int],
                 fetched: torch.Tensor | None) -> torch.Tensor:
        """g·W'ᵀ rows of the ticket ((rows, out), the pool's dtype); sealed ones are verified
        first."""
        start, rows = ticket
        if self.mode == "fixed":
            return self.fixed_products[name].expand(rows, -1)
        if fetched is None or fetched.dtype != torch.uint8 or fetched.dim() != 2 \
                or fetched.shape[0] != rows:
            raise IntegrityError(f"pad store: the device sent no sealed pad products for {name} "
                                 f"rows {start}–{start + rows}")
        self.cost.used_bytes += fetched.numel()
        # the device sends them ahead of its result: opened while it multiplies
        self.cost.overlap_crypto_bytes += fetched.numel()
        raw = fetched.numpy()
        try:
            if rows == 1:      # decode: one row, no joining
                plain = self.aead.decrypt(self._nonce(name, start), raw[0].tobytes(), _AAD)
            else:
                plain = b"".join(self.aead.decrypt(self._nonce(name, start + i), raw[i].tobytes(), _AAD)
                                 for i in range(rows))
        except InvalidTag:
            raise IntegrityError(f"pad store: a sealed pad product of {name} (rows {start}–"
                                 f"{start + rows - 1}) failed authentication (tampered, swapped "
                                 f"or stale)") from None
        return torch.frombuffer(bytearray(plain), dtype=self.dtype).view(rows, -1)

    def wipe(self) -> None:
        """End of the session: zero the rows kept in the enclave, and replace both keys with new
        ones nobody uses (Python cannot overwrite the old key bytes in place; dropping them is
        what it can do), so nothing left on the device can be opened again."""
        for t in [*self.pads.values(), *self.fixed_products.values()]:
            t.zero_()
        self.stream = PadStream()
        self.aead = AESGCM(new_key())

    def nbytes(self) -> int:
        """Enclave memory: two 32-byte keys, plus the rows themselves in `fixed` mode."""
        return 64 + sum(t.nbytes for t in [*self.pads.values(), *self.fixed_products.values()])
