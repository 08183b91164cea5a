"""The encrypted forward's algorithm on clear slot vectors.

`ClearEngine` has the `Engine` interface over numpy vectors that track their level like
ciphertexts: the executor runs unchanged on it — same diagonals, rotations, polynomials, Goldschmidt
iterations, masks and refresh points — with no encryption noise. What separates the two errors a
user of `he` sees: the algorithm's (polynomial ranges, Goldschmidt's iteration count, a score
outside the model's bound) from CKKS's (scale, rescale drift, ring size). `veil bench he` reports
both, and when an encrypted run goes wrong this says which side it is on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from veil.errors import ConfigError
from veil.he.ckks import Counters
from veil.he.executor import Z_MAX, HeOps, choose_layout, client_refresh
from veil.he.layout import Enc, Layout
from veil.he.params import CkksParams
from veil.model.config import ModelConfig
from veil.model.forward import hidden_states
from veil.model.ops import Step


class ClearCt:
    __slots__ = ("v", "level")

    def __init__(self, v: np.ndarray, level: int) -> None:
        self.v, self.level = v, level


class ClearEngine:
    """`Engine`'s interface on clear vectors (see the module docstring)."""

    symbolic = False

    def __init__(self, params: CkksParams) -> None:
        self.params, self.slots = params, params.slots
        self.counters = Counters()

    def level(self, ct: ClearCt) -> int:
        return ct.level

    def encrypt(self, vec: np.ndarray) -> ClearCt:
        return ClearCt(np.asarray(vec, dtype=np.float64).copy(), self.params.levels)

    def decrypt(self, ct: ClearCt) -> np.ndarray:
        return ct.v.copy()

    def _need(self, level: int, what: str) -> None:
        if level < 1:
            raise ConfigError(f"{what}: no level left (the depth plan is wrong)")

    def add(self, a: ClearCt, b: ClearCt) -> ClearCt:
        return ClearCt(a.v + b.v, min(a.level, b.level))

    def sub(self, a: ClearCt, b: ClearCt) -> ClearCt:
        return ClearCt(a.v - b.v, min(a.level, b.level))

    def add_many(self, cts: list[ClearCt]) -> ClearCt:
        return ClearCt(np.sum([c.v for c in cts], axis=0), min(c.level for c in cts))

    def add_plain(self, ct: ClearCt, vec: np.ndarray) -> ClearCt:
        return ClearCt(ct.v + np.asarray(vec, dtype=np.float64), ct.level)

    def add_const(self, ct: ClearCt, c: float) -> ClearCt:
        return ClearCt(ct.v + c, ct.level)

    def neg(self, ct: ClearCt) -> ClearCt:
        return ClearCt(-ct.v, ct.level)

    def multiplier(self, vec: np.ndarray, level: int) -> np.ndarray:
        return np.asarray(vec, dtype=np.float64)

    def mul_plain_raw(self, ct: ClearCt, pt: np.ndarray) -> ClearCt:
        return ClearCt(ct.v * pt, ct.level)

    def rescale(self, ct: ClearCt) -> ClearCt:
        self._need(ct.level, "rescale")
        return ClearCt(ct.v, ct.level - 1)

    def mul_plain(self, ct: ClearCt, vec: np.ndarray) -> ClearCt:
        self._need(ct.level, "plaintext product")
        return self.rescale(self.mul_plain_raw(ct, self.multiplier(vec, ct.level)))

    def mul_const(self, ct: ClearCt, c: float) -> ClearCt:
        return self.mul_plain(ct, np.full(self.slots, c))

    def mul(self, a: ClearCt, b: ClearCt) -> ClearCt:
        low = min(a.level, b.level)
        self._need(low, "ciphertext product")
        return ClearCt(a.v * b.v, low - 1)

    def mul_sum(self, pairs: list[tuple[ClearCt, ClearCt]]) -> ClearCt:
        low = min(min(a.level, b.level) for a, b in pairs)
        self._need(low, "ciphertext product")
        return ClearCt(np.sum([a.v * b.v for a, b in pairs], axis=0), low - 1)

    def rotate(self, ct: ClearCt, step: int) -> ClearCt:
        return ClearCt(np.roll(ct.v, -step), ct.level)


def local_forward(cfg: ModelConfig, weights: dict[str, Any], eng: Any, lay: Layout,
                  embeds: torch.Tensor, mask: bool = True, mask_bound: float = 64.0,
                  gs_tol: float = 1e-3, trace: list | None = None, z_max: float = Z_MAX
                  ) -> tuple[np.ndarray, HeOps]:
    """The executor's forward over `embeds` (n, d) in one process, on an engine that can also
    decrypt (`ClearEngine`, or a client `Engine` holding the secret key), the client's side of
    each refresh (an exact RMS norm when asked) done in place. Returns the hidden states (n, d)
    with every position but the last zeroed (what the server returns) and the executor (its cost
    record). `trace`, when given, collects (kind, max |value|) at each refresh."""
    n = embeds.shape[0]

    def refresh(cts, kind, n_tok, width):
        vals = client_refresh(cfg, lay, [eng.decrypt(c) for c in cts], kind, n_tok, width)
        if trace is not None:
            trace.append((kind, float(max(np.abs(v).max() for v in vals))))
        return [eng.encrypt(v) for v in vals]

    ops = HeOps(cfg, weights, eng, lay, refresh, gs_tol=gs_tol, mask=mask, mask_bound=mask_bound,
                z_max=z_max)
    ops.begin(n)
    x = Enc([eng.encrypt(v) for v in lay.pack(embeds.double().numpy())], cfg.d_model)
    out = ops.last_position(hidden_states(cfg, ops, None, Step(torch.arange(n)[None], None, 0),
                                          None, embeds=x))
    return lay.unpack([eng.decrypt(c) for c in out.cts], n, cfg.d_model), ops


def clear_forward(cfg: ModelConfig, weights: dict[str, Any], params: CkksParams,
                  embeds: torch.Tensor, max_tokens: int | None = None, **kw
                  ) -> tuple[np.ndarray, HeOps]:
    """`local_forward` on clear vectors, in the layout a session at `params` would use."""
    lay = choose_layout(cfg, params.slots, max_tokens)
    return local_forward(cfg, weights, ClearEngine(params), lay, embeds, **kw)
