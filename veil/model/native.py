"""veil's own model folder: for variants no Hugging Face architecture describes (MERGE students).

    veil_model.json     the `ModelConfig`, every knob spelled out
    model.safetensors   canonical tensor names (veil/model/weights.py), float32
    tokenizer files     copied from the base model, when it has them

Written atomically (a staging folder renamed into place), read with the same validation as HF
folders: a missing, mis-shaped or non-finite tensor is a `CheckpointError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from veil.errors import CheckpointError, ConfigError
from veil.model.config import ModelConfig, RopeConfig
from veil.model.weights import Weights, expected_shapes, read_safetensors, validate

CONFIG_FILE = "veil_model.json"
# the config's tuple fields (JSON lists in the file)
TUPLE_FIELDS = ("eos_token_ids", "quad", "poly", "norm_poly")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


def is_native(folder: Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    for knob in TUPLE_FIELDS:
        out[knob] = list(getattr(cfg, knob))
    return out


def config_from_dict(data: Any, source: str) -> ModelConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}")
    data = dict(data)
    try:
        data["rope"] = RopeConfig(**data.get("rope", {}))
        for knob in TUPLE_FIELDS:
            if knob in data:
                if not isinstance(data[knob], list):
                    raise ConfigError(f"{source}: {knob} must be a list of numbers")
                data[knob] = tuple(data[knob])
        return ModelConfig(**data)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def save_native(folder: Path, cfg: ModelConfig, weights: Weights,
                tokenizer_from: Path | None = None) -> Path:
    folder = Path(folder)
    validate(weights, cfg, str(folder))
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.detach().float().contiguous() for k, v in weights.items()},
              str(staging / "model.safetensors"))
    (staging / CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=1))
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file():
                shutil.copy2(Path(tokenizer_from) / name, staging / name)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder


def load_native(folder: Path) -> tuple[ModelConfig, Weights]:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    cfg = config_from_dict(data, str(path))
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"{folder}: no model.safetensors")
    weights = read_safetensors([folder / "model.safetensors"])
    validate(weights, cfg, str(folder))
    extra = sorted(set(weights) - set(expected_shapes(cfg)))
    if extra:
        raise CheckpointError(f"{folder}: unexpected tensor(s) {extra[:5]}")
    return cfg, weights


def read_config(folder: Path) -> ModelConfig:
    path = Path(folder) / CONFIG_FILE
    try:
        return config_from_dict(json.loads(path.read_text()), str(path))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
