"""Power-Softmax (Zimerman et al., arXiv 2410.09457): the polynomial model variant that a CKKS
(homomorphic-encryption) backend can run, and the conversion of an ordinary model into it.

HE evaluates additions and multiplications only, each multiplication costing depth; an exponential,
a max, a comparison or an inverse square root have no exact form. The variant removes them:
  * attention="power": softmax's exp(s) becomes s^p (p even), normalised by ε + Σ s^p (or, length
    agnostic, L·ε + Σ s^p): one division per query row, which HE approximates on the known range
    [ε/(ε + B^p), 1] of the normalised denominator — B the public bound on |s| (`score_bound`);
  * activation="poly": a low-degree least-squares fit of the base activation on [−R, R];
  * norm="poly" (optional): RMS norm whose u^(−1/2) is a polynomial fitted on [norm_lo, norm_hi].
Every bound is a promise only training can keep: the *range loss* penalises scores beyond ±B,
activation inputs beyond ±R and norm mean-squares outside [norm_lo, norm_hi]; `RangeOps` (plain's
ops noting those values while running the one forward) computes it, and also reports how often the
values still fall outside, the number the HE backend's error depends on.

Degrees: SiLU and GeLU are x/2 plus an even function, so their least-squares cubic on a symmetric
range *is* their quadratic (the cubic coefficient is 0) — degree 2 is the default; degree 4 is the
next that improves the fit, at one more HE level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from veil.backends.plain import TorchOps
from veil.errors import ConfigError
from veil.model.config import ModelConfig
from veil.model.forward import forward
from veil.model.ops import Step
from veil.model.weights import Weights, validate

# Defaults (B, ε, p): B = 2 with p = 4 keeps s^p ≤ 16, and ε = 4 ≥ B^p/4 puts the HE division's
# input z = (ε + mean s^p)/(ε + B^p) in [0.2, 1]: Goldschmidt needs
# ceil(log2(ln(tol)/ln(1 − 0.2))) = 5 iterations for tol 1e-3.
POWER_P = 4
POWER_EPS = 4.0
SCORE_BOUND = 2.0
ACT_BOUND = 4.0
ACT_DEGREE = 2
NORM_RANGE = (0.25, 4.0)
NORM_DEGREE = 3

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def fit_poly(fn: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, degree: int,
             relative: bool = False, points: int = 4001) -> tuple[float, ...]:
    """Least-squares coefficients (c₀, …, c_degree), low → high, of `fn` on a uniform grid over
    [lo, hi]; `relative` minimises the relative error instead (for u^(−1/2), whose values span
    an order of magnitude on the range)."""
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"fit_poly: need a finite range lo < hi, got [{lo}, {hi}]")
    if not isinstance(degree, int) or degree < 0:
        raise ConfigError(f"fit_poly: degree must be an integer ≥ 0, got {degree!r}")
    x = np.linspace(lo, hi, points)
    y = np.asarray(fn(x), dtype=np.float64)
    if y.shape != x.shape or not np.isfinite(y).all():
        raise ConfigError(f"fit_poly: the function is not finite on [{lo}, {hi}]")
    V = np.vander(x, degree + 1, increasing=True)
    w = 1.0 / np.abs(y) if relative else np.ones_like(y)
    if relative and not np.isfinite(w).all():
        raise ConfigError("fit_poly: a relative fit needs a function without zeros on the range")
    coeffs = np.linalg.lstsq(V * w[:, None], y * w, rcond=None)[0]
    return tuple(float(c) for c in coeffs)


def max_error(coeffs: tuple[float, ...], fn: Callable[[np.ndarray], np.ndarray], lo: float,
              hi: float, relative: bool = False, points: int = 4001) -> float:
    """The fit's largest (absolute, or relative) error on [lo, hi]."""
    x = np.linspace(lo, hi, points)
    y = np.asarray(fn(x), dtype=np.float64)
    err = np.abs(np.polynomial.polynomial.polyval(x, coeffs) - y)
    return float((err / np.abs(y) if relative else err).max())


def activation_poly(kind: str, bound: float, degree: int) -> tuple[float, ...]:
    """The least-squares polynomial of the activation `kind` on [−bound, bound]."""
    if kind not in ACTIVATIONS:
        raise ConfigError(f"no polynomial stand-in for activation {kind!r} "
                          f"(known: {', '.join(ACTIVATIONS)})")
    if not bound > 0:
        raise ConfigError(f"act_bound must be > 0, got {bound}")
    fn = ACTIVATIONS[kind]
    return fit_poly(lambda x: fn(torch.from_numpy(x)).numpy(), -bound, bound, degree)


def inv_sqrt_poly(lo: float, hi: float, degree: int) -> tuple[float, ...]:
    """u^(−1/2) on [lo, hi] by a polynomial, relative error minimised (what a norm multiplies by)."""
    if not 0 < lo < hi:
        raise ConfigError(f"norm range must satisfy 0 < lo < hi, got [{lo}, {hi}]")
    return fit_poly(lambda u: u ** -0.5, lo, hi, degree, relative=True)


def goldschmidt_iterations(eps: float, bound: float, p: int, tol: float = 1e-3) -> int:
    """Iterations the HE backend's division needs: z ∈ [ε/(ε + B^p), 1], error (1 − z_min)^(2^k)."""
    z_min = eps / (eps + bound ** p)
    return max(0, math.ceil(math.log2(math.log(tol) / math.log(1 - z_min))))


def variant_config(base: ModelConfig, p: int = POWER_P, eps: float = POWER_EPS,
                   bound: float = SCORE_BOUND, act_bound: float = ACT_BOUND,
                   degree: int = ACT_DEGREE, norm: str = "keep",
                   norm_range: tuple[float, float] = NORM_RANGE, norm_degree: int = NORM_DEGREE,
                   length_agnostic: bool = True) -> ModelConfig:
    """The Power-Softmax config of `base`: power attention (p, ε, B), the base activation's
    degree-`degree` fit on ±act_bound, and the base's norm (`norm="keep"`) or the polynomial RMS
    norm (`norm="poly"`, u^(−1/2) fitted on `norm_range`)."""
    if base.attention != "softmax":
        raise ConfigError(f"Power-Softmax converts softmax attention, not {base.attention!r}")
    if norm not in ("keep", "poly"):
        raise ConfigError(f"norm must be 'keep' or 'poly', got {norm!r}")
    knobs: dict[str, object] = dict(
        attention="power", power_p=p, power_eps=eps, score_bound=bound,
        power_length_agnostic=length_agnostic, activation="poly", act_bound=act_bound,
        poly=activation_poly(base.activation, act_bound, degree),
        name=f"{base.name or base.family}-power")
    if norm == "poly":
        lo, hi = norm_range
        knobs.update(norm="poly", norm_poly=inv_sqrt_poly(lo, hi, norm_degree), norm_lo=lo,
                     norm_hi=hi)
    return base.with_(**knobs)


def convert_weights(base_cfg: ModelConfig, weights: Weights, cfg: ModelConfig) -> Weights:
    """The base's weights as the variant's (same tensors; a LayerNorm's bias dropped when the norm
    becomes the polynomial RMS norm, which has none)."""
    out = {k: v.detach().clone().float() for k, v in weights.items()}
    if cfg.norm == "poly" and base_cfg.norm != "poly":
        out = {k: v for k, v in out.items() if not (k.endswith(".bias") and "norm" in k)}
    validate(out, cfg, "Power-Softmax model")
    return out


@dataclass
class RangeStats:
    """What `RangeOps` noted: per kind (scores, act, norm), the penalty terms of the calls (tensors,
    differentiable), the count of values outside the bound and of values seen, and per attention
    layer the largest |s| seen."""

    penalty: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    outside: dict[str, int] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    score_peak: dict[int, float] = field(default_factory=dict)
    z_peak: dict[int, float] = field(default_factory=dict)

    def loss(self) -> torch.Tensor:
        """The range loss: per kind, the mean of its calls' penalties; summed over kinds."""
        terms = [torch.stack(v).mean() for v in self.penalty.values() if v]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def fractions(self) -> dict[str, float]:
        return {k: self.outside[k] / self.seen[k] for k in self.seen if self.seen[k]}


def _hinge(excess: torch.Tensor, scale: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean((relu(excess)/scale)²), over the entries `weight` marks (all when None)."""
    sq = (F.relu(excess) / scale).pow(2)
    if weight is None:
        return sq.mean()
    weight = weight.expand_as(sq).to(sq.dtype)
    return (sq * weight).sum() / weight.sum().clamp(min=1)


class RangeOps(TorchOps):
    """plain's ops, noting the values Power-Softmax bounds: attention scores against ±score_bound
    (only the keys a query may see), activation inputs against ±act_bound, norm mean-squares against
    [norm_lo, norm_hi]. A bound of 0 is not checked. The penalties keep the autograd graph, so
    `stats.loss()` is the differentiable range loss of the forward just run."""

    def __init__(self, cfg: ModelConfig, weights: Weights, row_weight: float = 1.0) -> None:
        super().__init__(cfg, weights)
        self.stats = RangeStats()
        self.row_weight = row_weight

    def _note(self, kind: str, penalty: torch.Tensor, outside: torch.Tensor, seen: int) -> None:
        self.stats.penalty.setdefault(kind, []).append(penalty)
        self.stats.outside[kind] = self.stats.outside.get(kind, 0) + int(outside)
        self.stats.seen[kind] = self.stats.seen.get(kind, 0) + seen

    def power_scores(self, layer: int, q: torch.Tensor, keys: torch.Tensor, step: Step
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        s, allowed = super().power_scores(layer, q, keys, step)
        mag = s.abs()
        peak = float(mag.detach().max())
        self.stats.score_peak[layer] = max(self.stats.score_peak.get(layer, 0.0), peak)
        B = self.cfg.score_bound
        if B > 0:
            seen = int(allowed.expand_as(s).sum())
            self._note("scores", _hinge(mag - B, B, allowed), (mag.detach() > B).sum(), seen)
            # the row's length-agnostic denominator u = mean_j |s_j|^p against B^p: what HE's
            # Goldschmidt reciprocal reads as z = (u + ε)/(ε + B^p) — accurate for z ≤ 1, divergent
            # from z ≥ 2. A few large scores (at early positions, where a row has one or two keys)
            # barely move the score term's mean but decide z, hence a term per row.
            # Penalised as the row's power mean u^(1/p) against B (the score term's scale): u
            # itself reaches 10⁴·B^p on an untrained row, and its square hinge diverges.
            p = self.cfg.power_p
            bp = B ** p
            mask = allowed.expand_as(s)
            rows = mask.any(-1)
            # u^(1/p) = c·(mean (|s|/c)^p)^(1/p), c the row's max |s| (detached, as in
            # power_weights): no power overflows when a step sends the scores far out
            m = mag.masked_fill(~mask, 0.0)
            c = m.detach().amax(-1, keepdim=True) + self.cfg.power_delta
            mean = (m / c).pow(p).sum(-1) / mask.sum(-1).clamp(min=1)
            root = c[..., 0] * (mean + 1e-12).pow(1.0 / p)
            ud = root.detach().double() ** p
            if self.row_weight > 0:
                # a linear hinge: a row far out pulls no harder than one just out (a squared
                # one, at the weight this term needs, sent training to NaN within 600 steps)
                w = rows.expand_as(root).to(root.dtype)
                pen = (F.relu(root - B) / B * w).sum() / w.sum().clamp(min=1)
                self._note("rows", self.row_weight * pen, ((ud > bp) & rows).sum(),
                           int(rows.sum()))
            z = (ud[rows].max() + self.cfg.power_eps) / (self.cfg.power_eps + bp)
            self.stats.z_peak[layer] = max(self.stats.z_peak.get(layer, 0.0), float(z))
        return s, allowed

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        R = self.cfg.act_bound
        if R > 0:
            mag = x.abs()
            self._note("act", _hinge(mag - R, R), (mag.detach() > R).sum(), x.numel())
        return super().activation(x)

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.cfg.norm == "poly":
            lo, hi = self.cfg.norm_lo, self.cfg.norm_hi
            u = x.pow(2).mean(-1)
            pen = _hinge(u - hi, hi) + _hinge(lo - u, lo)
            ud = u.detach()
            self._note("norm", pen, ((ud > hi) | (ud < lo)).sum(), u.numel())
        return super().norm(x, name)


def range_stats(cfg: ModelConfig, weights: Weights, ids: torch.Tensor) -> RangeStats:
    """Run the model over whole windows (B, T) and return what `RangeOps` noted (no gradient)."""
    ops = RangeOps(cfg, weights)
    B, T = ids.shape
    with torch.inference_mode():
        forward(cfg, ops, ids, Step(torch.arange(T).expand(B, T), None, 0), ops.new_cache(B, T),
                last_only=True)
    return ops.stats


class _ScoreQuantiles(TorchOps):
    """plain's ops, noting per layer the `quantile` of |s| over the keys each query may see."""

    def __init__(self, cfg: ModelConfig, weights: Weights, quantile: float) -> None:
        super().__init__(cfg, weights)
        self.quantile = quantile
        self.seen: dict[int, list[float]] = {}

    def power_scores(self, layer: int, q: torch.Tensor, keys: torch.Tensor, step: Step
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        s, allowed = super().power_scores(layer, q, keys, step)
        mag = s.abs()[allowed.expand_as(s)].float()
        self.seen.setdefault(layer, []).append(float(torch.quantile(mag[:1 << 24], self.quantile)))
        return s, allowed


def calibrate_scores(cfg: ModelConfig, weights: Weights, batches: list[torch.Tensor],
                     quantile: float = 0.999, rounds: int = 2) -> Weights:
    """Scale each layer's query projection so that the `quantile` of its |scores| on `batches`
    lands on the bound B: a converted model then starts with its scores in range (the range loss
    small) instead of the teacher's softmax scores, which reach tens. Scaling q scales s linearly
    (RoPE is linear), so only the sharpness of attention changes. `rounds` passes, since a layer's
    scores depend on the layers below it."""
    if cfg.attention != "power" or cfg.score_bound <= 0:
        raise ConfigError("calibrate_scores needs a power-attention config with score_bound > 0")
    if not batches:
        raise ConfigError("calibrate_scores needs at least one batch")
    out = dict(weights)
    for _ in range(rounds):
        ops = _ScoreQuantiles(cfg, out, quantile)
        with torch.inference_mode():
            for ids in batches:
                B, T = ids.shape
                forward(cfg, ops, ids, Step(torch.arange(T).expand(B, T), None, 0),
                        ops.new_cache(B, T), last_only=True)
        for layer, vals in ops.seen.items():
            factor = cfg.score_bound / max(sum(vals) / len(vals), 1e-6)
            for part in ("weight", "bias"):
                name = f"layers.{layer}.attn.q.{part}"
                if name in out:
                    out[name] = out[name] * factor
    return out
