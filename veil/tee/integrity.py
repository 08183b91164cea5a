"""Freivalds verification of the device's linear results (beyond the papers).

Offline, for each matrix W' (out×in) the device holds, the enclave draws a secret random r (out)
and keeps u = r·W' (in). Since ỹ = x̃W'ᵀ implies ỹ·r = x̃·u, the enclave checks that per row:
O(in + out) per row instead of O(in·out). A device that
alters any output value by more than float rounding is caught with probability ~1 (r is Gaussian
and secret). Table lookups are checked the same way with E'·w precomputed per row.
Attention results are not covered (softmax is not linear); the docs say so.
"""

from __future__ import annotations

import torch

from veil.csprng import SecretRng
from veil.errors import IntegrityError

# relative to Σ|terms|: an honest float32 device stays near 4e-8 of it (measured on the default
# model and tiny presets, LoRO's pads and masks included); an altered value shows up at O(1/n)
REL_TOL = 2e-6


class Freivalds:
    def __init__(self, matrices: dict[str, torch.Tensor], tables: dict[str, torch.Tensor],
                 rng: SecretRng) -> None:
        self.r: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}
        for name, w in matrices.items():                               # w: (out, in)
            r = rng.randn(w.shape[0], dtype=torch.float64)
            self.r[name], self.u[name] = r, r @ w.double()            # (out,), (in,)
        self.table_w: dict[str, torch.Tensor] = {}
        self.table_proj: dict[str, torch.Tensor] = {}
        for name, t in tables.items():                                 # t: (rows, d)
            w = rng.randn(t.shape[1], dtype=torch.float64)
            self.table_w[name], self.table_proj[name] = w, t.double() @ w

    def check_linear(self, name: str, x_dev: torch.Tensor, y_dev: torch.Tensor) -> None:
        """x_dev (N, in) sent, y_dev (N, out) received: y·r must equal x·u row by row."""
        r, u = self.r[name], self.u[name]
        scale = y_dev.double().abs() @ r.abs() + x_dev.double().abs() @ u.abs()
        _verify(y_dev.double() @ r, x_dev.double() @ u, scale, f"device result for {name}")

    def check_rows(self, name: str, ids: torch.Tensor, rows: torch.Tensor) -> None:
        w = self.table_w[name]
        _verify(rows.double() @ w, self.table_proj[name][ids], rows.double().abs() @ w.abs(),
                f"device rows of {name}")

    def wipe(self) -> None:
        for d in (self.r, self.u, self.table_w, self.table_proj):
            for t in d.values():
                t.zero_()

    def nbytes(self) -> int:
        return sum(t.nbytes for d in (self.r, self.u, self.table_w, self.table_proj)
                   for t in d.values())


def _verify(lhs: torch.Tensor, rhs: torch.Tensor, scale: torch.Tensor, what: str) -> None:
    bad = ((lhs - rhs).abs() > REL_TOL * scale + 1e-30).nonzero()
    if bad.numel():
        raise IntegrityError(f"{what} failed verification (row {int(bad[0, 0])}): "
                             "the device altered a result")
