"""Opening a model by name: `"default"`, a tiny preset, an HF folder, a `.gguf`, or a veil model
folder — its plaintext parts, before any scheme touches them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from veil.model import native, zoo
from veil.model.config import ModelConfig, load_config
from veil.model.tokenizer import Tokenizer
from veil.model.weights import Weights, load_weights


@dataclass
class OpenedModel:
    """A model's plaintext parts."""

    cfg: ModelConfig
    weights: Weights
    tokenizer: Tokenizer | None
    folder: Path | None       # the HF folder (None for presets)
    source: str


def open_public(model: str | Path) -> tuple[ModelConfig, Tokenizer | None]:
    """A model's public parts — architecture and tokenizer — without its weights (what an MPC
    client or helper party needs)."""
    where = zoo.resolve(model)
    if isinstance(where, str):
        return zoo.preset(where), None
    cfg = native.read_config(where) if native.is_native(where) else load_config(where)
    return cfg, (Tokenizer(where) if Tokenizer.present(where) else None)


def open_model(model: str | Path) -> OpenedModel:
    """Resolve and read a model (`"default"`, a tiny preset, an HF folder or a .gguf)."""
    where = zoo.resolve(model)
    if isinstance(where, str):
        cfg = zoo.preset(where)
        return OpenedModel(cfg, zoo.random_weights(cfg), None, None, where)
    tokenizer = Tokenizer(where) if Tokenizer.present(where) else None
    if native.is_native(where):            # a variant veil wrote (e.g. a MERGE student)
        cfg, weights = native.load_native(where)
        return OpenedModel(cfg, weights, tokenizer, where, str(model))
    cfg = load_config(where)
    return OpenedModel(cfg, load_weights(where, cfg), tokenizer, where, str(model))
