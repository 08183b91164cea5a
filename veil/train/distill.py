"""Distillation on a fixed set of queries: what an attacker with query access does with the
answers (the black-box copy of issue #16, and MSP's fine-tuning stage).

The attacker sends each query window to the protected model and gets its next-token distribution
at every position (the strongest output an API gives: full probabilities); the student minimises
KL(victim ‖ student) over those positions only — never over text the victim did not answer. The
victim's answers are recomputed per batch from the victim's weights rather than stored (a
distribution over the vocabulary per token is ~200 KB); a protected model answers the same up to
its stated tolerance.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from veil.errors import ConfigError
from veil.model.config import ModelConfig
from veil.model.weights import Weights
from veil.train.merge_recipe import sequence_logits
from veil.train.trainer import Run, TrainSettings, train


def kd_loss(cfg: ModelConfig, teacher: Weights):
    """KL(teacher ‖ student) per position, averaged."""
    def loss(params: Weights, ids: torch.Tensor, gen: torch.Generator):
        with torch.no_grad():
            target = F.log_softmax(sequence_logits(cfg, teacher, ids).float(), -1)
        student = F.log_softmax(sequence_logits(cfg, params, ids), -1)
        kl = F.kl_div(student.flatten(0, 1), target.flatten(0, 1), log_target=True,
                      reduction="batchmean")
        return kl, {"kl": float(kl.detach())}
    return loss


def query_batches(queries: torch.Tensor, s: TrainSettings):
    """Step → a batch of query windows: epochs over the queries, each in a fresh order drawn
    from (seed, epoch)."""
    n = len(queries)
    per_epoch = max(1, n // s.batch)

    def at(step: int) -> torch.Tensor:
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([s.seed, epoch]).permutation(n)
        return queries[torch.from_numpy(order[i * s.batch:(i + 1) * s.batch])]
    return at


def _fit(params: Weights, loss, queries: torch.Tensor, epochs: int, batch: int, lr: float,
         seed: int, desc: str, progress: bool, weight_decay: float) -> list[dict]:
    """`epochs` passes over `queries` ((N, T) token ids) in batches of `batch`, optimising
    `params` in place with the trainer (a throw-away run folder: these fits are short)."""
    if queries.dim() != 2 or len(queries) < batch:
        raise ConfigError(f"distillation needs at least {batch} query windows, got "
                          f"{tuple(queries.shape)}")
    steps = max(1, epochs * (len(queries) // batch))
    s = TrainSettings(steps=steps, batch=batch, seq=int(queries.shape[1]), lr=lr, seed=seed,
                      warmup=max(1, min(10, steps // 10)), checkpoint_every=steps,
                      weight_decay=weight_decay)
    with tempfile.TemporaryDirectory(prefix="veil-distill-") as tmp:
        return train(params, loss, np.zeros(0, dtype=np.int64), s,
                     Run(Path(tmp) / "run", s, {"distill": desc}), desc, progress=progress,
                     batches=query_batches(queries, s))


def distill(cfg: ModelConfig, student: Weights, teacher: Weights, queries: torch.Tensor,
            epochs: int = 1, batch: int = 8, lr: float = 1e-4, seed: int = 0,
            progress: bool = False) -> list[dict]:
    """Train `student` (in place) on the teacher's answers to `queries` ((N, T) token ids):
    `epochs` passes in batches of `batch`. Returns the loss log."""
    for k in student:
        student[k] = student[k].detach().clone().float()
    return _fit(student, kd_loss(cfg, teacher), queries, epochs, batch, lr, seed, "distill",
                progress, weight_decay=TrainSettings.weight_decay)


def distill_in_subspaces(cfg: ModelConfig, base: Weights, subspaces: dict[str, tuple[torch.Tensor, torch.Tensor]],
                         teacher: Weights, queries: torch.Tensor, epochs: int = 1, batch: int = 8,
                         lr: float = 1e-3, seed: int = 0, progress: bool = False) -> Weights:
    """Distillation with few parameters: each named matrix becomes base + U·C·Vᵀ, U (out × k) and
    V (in × k) fixed, only the k × k core C trained (from zero). An attacker who learned where a
    fine-tune changed a matrix (its singular subspaces) fits the change there from few queries.
    Returns the assembled weights."""
    fixed = {k: v.detach().float() for k, v in base.items()}
    basis = {n: (u.float(), v.float()) for n, (u, v) in subspaces.items()}
    cores = {n: torch.zeros(u.shape[1], v.shape[1]) for n, (u, v) in basis.items()}

    def assemble(c: Weights) -> Weights:
        w = dict(fixed)
        for n, (u, v) in basis.items():
            w[n] = fixed[n] + u @ c[n] @ v.t()
        return w

    inner = kd_loss(cfg, teacher)
    _fit(cores, lambda c, ids, gen: inner(assemble(c), ids, gen), queries, epochs, batch, lr,
         seed, "distill (subspaces)", progress, weight_decay=0.0)
    with torch.no_grad():
        return {k: v.detach() for k, v in assemble(cores).items()}
