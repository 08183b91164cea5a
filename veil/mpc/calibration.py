"""Which norm form a model needs under MPC, from a public calibration of its norm inputs.

SpuOps' range-reduced norm exists for models with massive activations (SmolLM2's residual entries
reach ~22 000): there one mean square wraps FM64's ring (|x| ≳ 11 600 at 18 fractional bits) and
one rsqrt of a large mean square keeps ~3 significant bits. It costs three extra squares, four
rsqrts and the selects — 3.7× a plain LayerNorm on a 768-wide row — so a model whose norm inputs
stay small should not pay it. The owner (who holds the weights) runs the model in plaintext on
public calibration tokens and takes the plain form only when every norm input is well inside its
range — after a public power-of-two scale, chosen from the same calibration, that moves small
inputs (random test weights: mean squares ~1e-3) up to where fixed point keeps their precision —
with a 4× margin on every limit. The choice (a form and a shift) is public per model, agreed by
both parties like every other protocol setting (MpcConfig.agreement).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from veil.backends.plain import TorchOps
from veil.model.config import ModelConfig
from veil.model.forward import forward
from veil.model.ops import Step
from veil.model.weights import Weights
from veil.mpc.config import MpcConfig

# the plain form's limits at FM64 / 18 fractional bits, each with a 4× margin: no square wraps
# (|x| < 11 600), 1/rms keeps ≥ 8 significant bits (mean square < 2^16 → 1/rms > 2^-8, i.e. > 2^10
# steps of 2^-18) and SPU's rsqrt stays in its accurate range from below (mean square > 2^-6)
PLAIN_MAX_ABS = 11_600 / 4
PLAIN_MAX_MEAN_SQUARE = 2.0 ** 16 / 4
PLAIN_MIN_MEAN_SQUARE = 2.0 ** -6 * 4
CALIBRATION_TOKENS = 64


@dataclass(frozen=True)
class NormRange:
    """What the calibration saw at the norms' inputs."""

    max_abs: float
    max_mean_square: float
    min_mean_square: float

    def plain_shift(self) -> int | None:
        """The public power-of-two pre-scale 2^k (smallest |k|) that puts every norm input in the
        plain form's range, or None when no scale does (the spread is too wide)."""
        for k in sorted(range(-12, 13), key=abs):
            s = 2.0 ** k
            if (self.max_abs * s < PLAIN_MAX_ABS and self.max_mean_square * s * s < PLAIN_MAX_MEAN_SQUARE
                    and self.min_mean_square * s * s > PLAIN_MIN_MEAN_SQUARE):
                return k
        return None

    @property
    def plain_fits(self) -> bool:
        return self.plain_shift() is not None


class _NormWatch(TorchOps):
    def __init__(self, cfg: ModelConfig, weights: Weights) -> None:
        super().__init__(cfg, weights)
        self.seen: list[torch.Tensor] = []

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        rows = x.detach().reshape(-1, x.shape[-1]).double()
        # what `normalize` squares: a LayerNorm's input centred, an RMS norm's as it is
        self.seen.append(rows - rows.mean(-1, keepdim=True) if self.cfg.norm == "layer" else rows)
        return super().norm(x, name)


def norm_range(cfg: ModelConfig, weights: Weights, tokens: int = CALIBRATION_TOKENS) -> NormRange:
    """The norm inputs' range on public calibration tokens (a fixed, public sequence of ids: the
    range is a property of the model, not of a user's text)."""
    n = min(tokens, cfg.max_seq_len)
    gen = torch.Generator().manual_seed(0)     # public calibration input, not a secret
    ids = torch.randint(0, cfg.vocab_size, (2, n), generator=gen)
    ops = _NormWatch(cfg, weights)
    with torch.inference_mode():
        forward(cfg, ops, ids, Step(torch.arange(n).expand_as(ids), None, 0),
                ops.new_cache(*ids.shape))
    xs = torch.cat(ops.seen)
    ms = xs.pow(2).mean(-1)
    return NormRange(float(xs.abs().max()), float(ms.max()), float(ms.min()))


def needs_norm_form(cfg: ModelConfig, weights: Weights) -> tuple[str, int]:
    """("plain", shift) or ("reduced", 0) for this model (affine norms take no rsqrt: plain)."""
    if cfg.norm not in ("layer", "rms"):
        return "plain", 0
    shift = norm_range(cfg, weights).plain_shift()
    return ("plain", shift) if shift is not None else ("reduced", 0)


def resolve(mc: MpcConfig, cfg: ModelConfig, weights: Weights) -> MpcConfig:
    """`mc` with norm_range "auto" replaced by the calibrated form and scale (explicit choices
    stay)."""
    if mc.norm_range != "auto":
        return mc
    form, shift = needs_norm_form(cfg, weights)
    return replace(mc, norm_range=form, norm_shift=shift)
