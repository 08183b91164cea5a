"""A plain full fine-tune: the private model a TEE scheme protects in the stealing evaluation
(issue #16) and the victim of the KV-cache inversion benchmark's attack 4.

Every parameter of `model` is trained with next-token cross-entropy on a corpus's train split
(AdamW, warm-up then cosine decay; resumable through the trainer's checkpoints), and the result is
saved as a veil model folder — the owner's fine-tune of a public prior.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from veil.errors import ConfigError
from veil.model import native, zoo
from veil.model.config import ModelConfig
from veil.model.weights import Weights
from veil.model.opening import open_model
from veil.train.merge_recipe import ce_loss, corpus_tokens
from veil.train.trainer import Run, TrainSettings, batch_at, train

# the train split's first characters used as fine-tuning text (the split is ~4.5 MB)
TRAIN_CHARS = 3_000_000


def default_out(model: str, corpus: str, steps: int, lora_rank: int | None = None) -> Path:
    suffix = f"-lora{lora_rank}" if lora_rank else ""
    return zoo.cache_dir() / "victims" / f"{Path(model).name}-{corpus}-{steps}{suffix}"


def finetune_settings(steps: int, batch: int = 8, seq: int = 64, lr: float = 1e-4,
                      seed: int = 0) -> TrainSettings:
    return TrainSettings(steps=steps, batch=batch, seq=seq, lr=lr, seed=seed)


def finetune(model: str, steps: int, corpus: str = "shakespeare", out: Path | None = None,
             settings: TrainSettings | None = None, progress: bool = True,
             lora_rank: int | None = None) -> Path:
    """`model` fine-tuned on `corpus`'s train split — every parameter, or (`lora_rank`) a LoRA
    of that rank on every layer's linear, merged into the weights; the saved folder (made once:
    a folder that already holds a model is returned as it is, an interrupted run resumes)."""
    s = settings or finetune_settings(steps)
    if lora_rank is not None and lora_rank < 1:
        raise ConfigError(f"lora rank must be ≥ 1, got {lora_rank}")
    out = Path(out) if out is not None else default_out(model, corpus, s.steps, lora_rank)
    if (out / "model.safetensors").is_file():
        return out
    opened = open_model(model)
    if opened.tokenizer is None:
        raise ConfigError(f"{model} has no tokenizer; a fine-tune on text needs one")
    tokens = corpus_tokens(opened.tokenizer, corpus, "train", TRAIN_CHARS)
    w = {k: v.clone().float() for k, v in opened.weights.items()}
    tag = {"model": model, "corpus": corpus, **({"lora_rank": lora_rank} if lora_rank else {})}
    run = Run(out.with_name(out.name + ".run"), s, tag)
    if lora_rank:
        w = _train_lora(opened.cfg, w, tokens, s, run, lora_rank, progress)
    else:
        train(w, ce_loss(opened.cfg), tokens, s, run, "fine-tune", progress=progress)
    return native.save_native(out, opened.cfg, {k: v.detach() for k, v in w.items()},
                              opened.folder)


def lora_targets(weights: Weights) -> list[str]:
    """Every layer's linear weight (attention and MLP), as LoRA usually targets."""
    return sorted(k for k, v in weights.items()
                  if k.startswith("layers.") and k.endswith(".weight") and v.dim() == 2)


def _train_lora(cfg: ModelConfig, w: Weights, tokens: np.ndarray, s: TrainSettings, run: Run,
                rank: int, progress: bool) -> Weights:
    """W + (2r/r)·B·A per target (B from zero, A Gaussian with variance 1/in: LoRA's init; the
    init is no secret, so torch's generator draws it)."""
    g = torch.Generator().manual_seed(s.seed)
    factors = {}
    for n in lora_targets(w):
        out_dim, in_dim = w[n].shape
        factors[f"{n}.A"] = torch.randn(rank, in_dim, generator=g) / in_dim ** 0.5
        factors[f"{n}.B"] = torch.zeros(out_dim, rank)
    base = ce_loss(cfg)

    def merged(f: Weights) -> Weights:
        m = dict(w)
        for n in lora_targets(w):
            m[n] = w[n] + LORA_SCALE * f[f"{n}.B"] @ f[f"{n}.A"]
        return m

    train(factors, lambda f, ids, gen: base(merged(f), ids, gen), tokens, s, run,
          "fine-tune (LoRA)", progress=progress)
    with torch.no_grad():
        return merged(factors)


LORA_SCALE = 2.0        # α / r with α = 2r


def training_windows(tokens: np.ndarray, settings: TrainSettings) -> torch.Tensor:
    """The (steps·batch, seq) windows the fine-tune trained on, in order (batches are a pure
    function of (seed, step)): the data an attacker's query budget is a share of."""
    return torch.cat([batch_at(tokens, i, settings) for i in range(settings.steps)])
