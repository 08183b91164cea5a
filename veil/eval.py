"""Perplexity and next-token accuracy over fixed, non-overlapping windows of held-out text."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from veil.api import Model
from veil.errors import InputError


@dataclass(frozen=True)
class PerplexityResult:
    corpus: str
    windows: int
    window_len: int
    tokens: int
    nll: float
    perplexity: float
    top1_accuracy: float


def perplexity(model: Model, ids: list[int], window: int = 128, max_windows: int = 16,
               corpus: str = "") -> PerplexityResult:
    """Mean next-token NLL and top-1 accuracy over the first `max_windows` windows of `ids`."""
    if window < 2 or window > model.cfg.max_seq_len - 1:
        raise InputError(f"window must be in [2, {model.cfg.max_seq_len - 1}], got {window}")
    n = min(max_windows, len(ids) // window)
    if n < 1:
        raise InputError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    nll, correct, count = 0.0, 0, 0
    for w in range(n):
        chunk = ids[w * window:(w + 1) * window]
        logits = model.logits([chunk])[0, :-1]                            # (T-1, V)
        target = torch.tensor(chunk[1:])
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
        count += len(chunk) - 1
    return PerplexityResult(corpus, n, window, count, nll / count, math.exp(nll / count),
                            correct / count)
