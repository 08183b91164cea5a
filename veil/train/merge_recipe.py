"""`veil train merge`: MERGE's two-stage recipe, then the merge, then the quality table.

  stage 1  fine-tune the base model on the task corpus (next-token cross-entropy);
  stage 2  the MERGE student initialised from it (variants/merge.py: constant attention from the
           teacher's mean attention, affine norms from its mean input scale, quad activation),
           trained with  (1−λ)·CE + λ·(1 − cos(h_t, E(x_{t+1})))  on noisy, dropped-out input
           embeddings (robustness to resent states); λ = 0.75, noise ±0.75, dropout 0.6;
  merge    the trained student's norms folded into its projections, table softmaxed → a veil
           model folder that `veil generate --scheme mpc` (and plain) loads.

On this machine's CPU the recipe runs on a reduced model — the default model's first few layers
(`layers`), context 64–128 — in minutes per stage; on a GPU (`device="cuda"`) the same code trains
the full model. Everything lands in the cache (`out`): resumable checkpoints per stage, the
fine-tuned base and the merged student as model folders, and quality.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from veil.backends.plain import TorchOps, TrainCache
from veil.data import corpus_text
from veil.errors import ConfigError
from veil.model import native, zoo
from veil.model.config import ModelConfig
from veil.model.forward import hidden_states
from veil.model.opening import open_model
from veil.model.weights import Weights
from veil.model.ops import Step
from veil.train.quality import quality_table
from veil.train.trainer import Run, TrainSettings, batch_at, train
from veil.variants.merge import calibrate, merge, student_weights, variant_config


@dataclass(frozen=True)
class MergeRecipe:
    model: str = "default"
    layers: int = 4                 # reduced model: keep the first `layers` layers (0 = all)
    context: int = 64               # MSL: the constant-attention table size
    variant: str = "merge"          # merge | only-er | only-mm
    lam: float = 0.75               # weight of the embedding cosine loss
    noise: float = 0.75             # uniform input noise, in units of the embedding table's RMS
    dropout: float = 0.6            # dropout on the input embeddings
    # measured on the 4-layer CPU cut: 60 steps at 1e-4 left stage 1 at perplexity ~49 000;
    # these reach ~840 on the 4-layer cut (benchmarks/results/merge_quality.md)
    stage1: TrainSettings = field(default_factory=lambda: TrainSettings(steps=150, lr=5e-4))
    stage2: TrainSettings = field(default_factory=lambda: TrainSettings(steps=200, lr=5e-4))
    corpus: str = "shakespeare"
    eval_windows: int = 8
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0 <= self.lam <= 1:
            raise ConfigError(f"lam must be in [0, 1], got {self.lam}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.noise < 0:
            raise ConfigError(f"noise must be ≥ 0, got {self.noise}")
        for s in (self.stage1, self.stage2):
            if s.seq > self.context:
                raise ConfigError(f"training windows of {s.seq} tokens exceed the context "
                                  f"{self.context}")


def reduced(cfg: ModelConfig, weights: Weights, layers: int) -> tuple[ModelConfig, Weights]:
    """The first `layers` layers of a model (with its embeddings, final norm and head)."""
    if layers <= 0 or layers >= cfg.n_layers:
        return cfg, dict(weights)
    keep = {k: v for k, v in weights.items()
            if not k.startswith("layers.") or int(k.split(".")[1]) < layers}
    return cfg.with_(n_layers=layers, name=f"{cfg.name or cfg.family}-{layers}L"), keep


def _steps(T: int, B: int) -> Step:
    return Step(torch.arange(T).expand(B, T), None, 0)


def sequence_logits(cfg: ModelConfig, params: Weights, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of whole windows through veil's forward (differentiable; no KV cache)."""
    ops = TorchOps(cfg, params)
    B, T = ids.shape
    return ops.lm_head(hidden_states(cfg, ops, ids, _steps(T, B), TrainCache(cfg, B, T)))


def ce_loss(cfg: ModelConfig) -> callable:
    """Stage 1: next-token cross-entropy through veil's forward."""
    def loss(params: Weights, ids: torch.Tensor, gen: torch.Generator):
        logits = sequence_logits(cfg, params, ids)
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        return ce, {"ce": float(ce.detach())}
    return loss


def merge_loss(cfg: ModelConfig, r: MergeRecipe) -> callable:
    """Stage 2: (1−λ)·CE + λ·(1 − cos(h_t, E(x_{t+1}))) on noisy, dropped-out input embeddings.
    The cosine target is detached (the table is also the LM head when tied: pulling it towards
    the states would let both drift together)."""
    def loss(params: Weights, ids: torch.Tensor, gen: torch.Generator):
        ops = TorchOps(cfg, params)
        B, T = ids.shape
        table = params["embed.weight"]
        x = F.embedding(ids, table)
        if r.noise > 0:
            scale = r.noise * table.detach().pow(2).mean().sqrt()
            x = x + (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device) * scale
        if r.dropout > 0:
            keep = (torch.rand(x.shape, generator=gen) >= r.dropout).to(x.device)
            x = x * keep / (1 - r.dropout)
        h = hidden_states(cfg, ops, None, _steps(T, B), TrainCache(cfg, B, T), embeds=x)
        ce = F.cross_entropy(ops.lm_head(h[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        target = F.embedding(ids[:, 1:], table).detach()
        cos = 1 - F.cosine_similarity(h[:, :-1], target, dim=-1).mean()
        if cfg.generation != "embedding_resend":
            return ce, {"ce": float(ce.detach())}
        return (1 - r.lam) * ce + r.lam * cos, {"ce": float(ce.detach()), "cos": float(cos.detach())}
    return loss


def corpus_tokens(tokenizer, corpus: str, split: str, limit_chars: int | None = None) -> np.ndarray:
    text = corpus_text(corpus, split)
    if limit_chars:
        text = text[:limit_chars]
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def run_recipe(r: MergeRecipe, out: Path, progress: bool = True, tokens: dict | None = None
               ) -> dict:
    """The whole recipe (each stage resumes from its checkpoint); returns the quality table."""
    torch.set_default_device(r.device)
    opened = open_model(r.model)
    base_cfg, base_w = reduced(opened.cfg, opened.weights, r.layers)
    base_cfg = base_cfg.with_(max_seq_len=r.context)
    if base_cfg.position == "learned":
        base_w["pos_embed.weight"] = base_w["pos_embed.weight"][:base_cfg.max_seq_len]
    if tokens is None:
        if opened.tokenizer is None:
            raise ConfigError(f"{r.model}: no tokenizer; `veil train merge` needs one for the "
                              "corpus (or pass token arrays)")
        tokens = {"train": corpus_tokens(opened.tokenizer, r.corpus, "train", 3_000_000),
                  "heldout": corpus_tokens(opened.tokenizer, r.corpus, "heldout", 200_000)}
    out = Path(out)
    tag = {"model": str(r.model), "layers": r.layers, "context": r.context}

    base_w = {k: v.clone().float().to(r.device) for k, v in base_w.items()}
    train(base_w, ce_loss(base_cfg), tokens["train"], r.stage1,
          Run(out / "stage1", r.stage1, {**tag, "stage": 1}), "stage 1 (fine-tune)",
          progress=progress)
    tuned = native.save_native(out / "base", base_cfg, base_w, opened.folder)

    scfg = variant_config(base_cfg, r.variant, r.context)
    calib_batches = [batch_at(tokens["train"], 10_000 + i, r.stage2) for i in range(4)]
    calib = calibrate(base_cfg, base_w, calib_batches, r.context)
    student = student_weights(base_cfg, base_w, scfg, calib)
    # the paper's sanity row: the fine-tuned model itself, generating by resending
    untrained = native.save_native(out / "er-untrained", base_cfg.with_(
        generation="embedding_resend"), base_w, opened.folder)
    train(student, merge_loss(scfg, r), tokens["train"], r.stage2,
          Run(out / "stage2", r.stage2, {**tag, "stage": 2, "variant": r.variant,
                                         "recipe": [r.lam, r.noise, r.dropout]}),
          "stage 2 (MERGE student)", progress=progress)
    if scfg.attention == "constant" and scfg.norm == "affine":
        mcfg, mw = merge(scfg, student)
    else:
        mcfg, mw = scfg, student
    merged = native.save_native(out / "merged", mcfg, mw, opened.folder)
    table = quality_table({"base (fine-tuned)": tuned, "ER without training": untrained,
                           f"MERGE student ({r.variant})": merged},
                          tokens["heldout"], window=r.context, windows=r.eval_windows)
    table["recipe"] = {**asdict(r), "stage1": asdict(r.stage1), "stage2": asdict(r.stage2)}
    (out / "quality.json").write_text(json.dumps(table, indent=1))
    torch.set_default_device("cpu")
    return table


def default_out(r: MergeRecipe) -> Path:
    name = Path(str(r.model)).name.replace(".", "_")
    return zoo.cache_dir() / "merge" / f"{name}-{r.layers}L-{r.context}-{r.variant}"
