"""The depth plan and cost projection of an encrypted forward, without encryption.

`CountingEngine` has the `Engine` interface but its "ciphertexts" carry only their level: running
the one forward through `HeOps` on it replays exactly the executor's decisions — where it
refreshes, how many rotations, products and rescales at which level — in a fraction of a second.
That is the depth planner `veil explain --scheme he` prints, and, with per-primitive timings
measured on the real engine (`primitive_costs`), a projection of shapes too large to run here
(e.g. Pythia-70M at 128 tokens), checked against measured runs in `veil bench he`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from veil.errors import ConfigError
from veil.he.ckks import Counters
from veil.he.executor import Z_MAX, HeOps, choose_layout
from veil.he.layout import Enc, Layout
from veil.he.params import CkksParams
from veil.model.config import ModelConfig
from veil.model.forward import hidden_states
from veil.model.ops import Step


class _Ct:
    __slots__ = ("level",)

    def __init__(self, level: int) -> None:
        self.level = level


@dataclass
class Tally:
    """Primitive counts by (kind, level)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, kind: str, level: int, n: int = 1) -> None:
        self.counts[(kind, level)] += n

    def by_kind(self) -> dict[str, int]:
        out: Counter = Counter()
        for (kind, _), n in self.counts.items():
            out[kind] += n
        return dict(out)


class CountingEngine:
    """`Engine`'s interface over level-only ciphertexts (see the module docstring)."""

    symbolic = True      # the executor skips building slot vectors nobody will encode

    def __init__(self, params: CkksParams) -> None:
        self.params, self.slots = params, params.slots
        self.tally = Tally()
        self.counters = Counters()
        self.steps: set[int] = set()

    def level(self, ct: _Ct) -> int:
        return ct.level

    def fresh(self) -> _Ct:
        return _Ct(self.params.levels)

    def _need(self, level: int, what: str) -> None:
        if level < 1:
            raise ConfigError(f"{what}: no level left (the depth plan is wrong)")

    def add(self, a: _Ct, b: _Ct) -> _Ct:
        low = min(a.level, b.level)
        self.tally.add("add", low)
        return _Ct(low)

    sub = add

    def add_many(self, cts: list[_Ct]) -> _Ct:
        low = min(c.level for c in cts)
        self.tally.add("add", low, len(cts) - 1)
        return _Ct(low)

    def add_plain(self, ct: _Ct, vec) -> _Ct:
        self.tally.add("encode", ct.level)
        self.tally.add("add", ct.level)
        return _Ct(ct.level)

    def add_const(self, ct: _Ct, c: float) -> _Ct:
        return self.add_plain(ct, None)

    def neg(self, ct: _Ct) -> _Ct:
        return _Ct(ct.level)

    def multiplier(self, vec, level: int) -> int:
        self.tally.add("encode", level)
        return level

    def mul_plain_raw(self, ct: _Ct, pt: int) -> _Ct:
        self.tally.add("pt_mul", ct.level)
        return _Ct(ct.level)

    def rescale(self, ct: _Ct) -> _Ct:
        self._need(ct.level, "rescale")
        self.tally.add("rescale", ct.level)
        return _Ct(ct.level - 1)

    def mul_plain(self, ct: _Ct, vec) -> _Ct:
        self._need(ct.level, "plaintext product")
        return self.rescale(self.mul_plain_raw(ct, self.multiplier(vec, ct.level)))

    def mul_const(self, ct: _Ct, c: float) -> _Ct:
        return self.mul_plain(ct, None)

    def mul(self, a: _Ct, b: _Ct) -> _Ct:
        low = min(a.level, b.level)
        self._need(low, "ciphertext product")
        self.tally.add("ct_mul", low)
        return self.rescale(_Ct(low))

    def mul_sum(self, pairs: list[tuple[_Ct, _Ct]]) -> _Ct:
        low = min(min(a.level, b.level) for a, b in pairs)
        self._need(low, "ciphertext product")
        self.tally.add("ct_mul_raw", low, len(pairs))
        self.tally.add("relin", low)
        return self.rescale(_Ct(low))

    def rotate(self, ct: _Ct, step: int) -> _Ct:
        step = (step + self.slots // 2) % self.slots - self.slots // 2
        if step:
            self.tally.add("rotate", ct.level)
        return _Ct(ct.level)


@dataclass
class Plan:
    params: str
    layout: Layout
    tokens: int
    refreshes: list[dict]
    tally: Tally
    gs_iterations: int
    levels: int

    def summary(self) -> dict:
        kinds: Counter = Counter(r["kind"] for r in self.refreshes)
        return {"params": self.params, "levels": self.levels, "tokens": self.tokens,
                "T": self.layout.T, "C": self.layout.C, "gs_iterations": self.gs_iterations,
                "refreshes": len(self.refreshes), "refresh_kinds": dict(kinds),
                "refresh_ciphertexts": sum(r["ciphertexts"] for r in self.refreshes),
                "primitives": self.tally.by_kind()}


def plan(cfg: ModelConfig, params: CkksParams, tokens: int, max_tokens: int | None = None,
         weights: dict | None = None, gs_tol: float = 1e-3, z_max: float = Z_MAX) -> Plan:
    """Replay the encrypted forward over `tokens` tokens on level-only ciphertexts."""
    lay = choose_layout(cfg, params.slots, max_tokens or tokens)
    eng = CountingEngine(params)
    if weights is None:      # the plan depends on shapes only; zero layers keep it fast
        from veil.model.weights import expected_shapes
        weights = {k: torch.full(s, 0.01) for k, s in expected_shapes(cfg).items()
                   if k.startswith("layers.")}

    def refresh(cts, kind, n, width):
        return [eng.fresh() for _ in cts]

    ops = HeOps(cfg, weights, eng, lay, refresh, gs_tol=gs_tol, mask=True, z_max=z_max)
    ops.rng = _NoRng()
    ops.begin(tokens)
    step = Step(torch.arange(tokens)[None], None, 0)
    x = Enc([eng.fresh() for _ in range(lay.chunks(cfg.d_model))], cfg.d_model)
    ops.last_position(hidden_states(cfg, ops, None, step, None, embeds=x))
    return Plan(params.name, lay, tokens, ops.cost.refreshes, eng.tally, ops.gs_iters,
                params.levels)


class _NoRng:
    """Masks need no randomness in a plan (only their count matters)."""

    def uniform(self, n, low, high):
        return torch.zeros(n)


# ---- projection -----------------------------------------------------------------------------

def primitive_costs(params: CkksParams, repeats: int = 5) -> dict[tuple[str, int], float]:
    """Median seconds of each primitive at each level on the real engine (one thread)."""
    from veil.he.ckks import Engine

    eng = Engine.client(params, steps=[1])
    rng = np.random.default_rng(0)
    vec = rng.uniform(-1, 1, params.slots)
    out: dict[tuple[str, int], float] = {}
    ct = eng.encrypt(vec)
    for level in range(params.levels, -1, -1):
        c = eng.mod_to(ct, level)
        samples: dict[str, list[float]] = {k: [] for k in ("rotate", "encode", "pt_mul", "add",
                                                          "ct_mul", "rescale", "ct_mul_raw",
                                                          "relin")}
        for _ in range(repeats):
            t0 = time.perf_counter(); eng.rotate(c, 1); samples["rotate"].append(time.perf_counter() - t0)
            t0 = time.perf_counter(); eng.encode(vec, level, eng.scale); samples["encode"].append(time.perf_counter() - t0)
            t0 = time.perf_counter(); eng.add(c, c); samples["add"].append(time.perf_counter() - t0)
            if level >= 1:        # a product at level 0 has no prime left to rescale by
                pt = eng.multiplier(vec, level)
                t0 = time.perf_counter(); p = eng.mul_plain_raw(c, pt); samples["pt_mul"].append(time.perf_counter() - t0)
                t0 = time.perf_counter(); eng.rescale(p); samples["rescale"].append(time.perf_counter() - t0)
                from tenseal import sealapi as seal
                t0 = time.perf_counter()
                raw = seal.Ciphertext()
                eng.evaluator.multiply(c, c, raw)
                samples["ct_mul_raw"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                eng.evaluator.relinearize_inplace(raw, eng.relin)
                samples["relin"].append(time.perf_counter() - t0)
                samples["ct_mul"].append(samples["ct_mul_raw"][-1] + samples["relin"][-1])
        for k, v in samples.items():
            if v:
                out[(k, level)] = float(np.median(v))
    eng.close()
    return out


def project(tally: Tally, costs: dict[tuple[str, int], float]) -> dict[str, float]:
    """Seconds per primitive kind: counts × measured per-level costs."""
    out: Counter = Counter()
    for (kind, level), n in tally.counts.items():
        key = (kind, level) if (kind, level) in costs else (kind, max(level, 1))
        out[kind] += n * costs.get(key, 0.0)
    return dict(out)
