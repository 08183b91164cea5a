"""Protected artifacts on disk: what `veil protect MODEL --scheme S --out DIR` writes and
`veil.load(DIR)` reads. This module is the format; veil/schemes/artifacts.py decides what goes in.

DIR/device/model.safetensors  everything the untrusted side may hold (masked / obfuscated weights;
                              absent when the device holds nothing, as for `shielded`)
DIR/device/config.json        the architecture (public: the attacker knows it anyway)
DIR/enclave.sealed            the enclave's secrets, AES-256-GCM (veil/tee/sealing.py), with the
                              scheme's public settings and the digest of the device weights it
                              was made with
DIR/tokenizer files           public
DIR/veil-artifact.json        {"scheme": …, "format": 2, "source": …}
The sealing key never goes into DIR: it comes from a key file outside it or $VEIL_SEAL_KEY.
Nothing runs on unverified secrets: the sealed file is authenticated before it is parsed, and the
device weights are checked against the sealed digest before the enclave reads them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from veil.errors import ConfigError, IntegrityError, UnsupportedError
from veil.model.config import ModelConfig, load_config
from veil.model.zoo import file_sha256
from veil.tee.process import SafetensorsReader
from veil.tee.sealing import read_key, seal, unseal, write_key

ARTIFACT = "veil-artifact.json"
FORMAT = 2                        # 2: the scheme's public settings sealed apart from its secrets
_AESGCM_MAX = (1 << 31) - 1       # the most one AES-GCM call of `cryptography` takes
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json")


def is_artifact(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and (Path(path) / ARTIFACT).is_file()


def check_free(out: Path, key_file: Path | None) -> None:
    """`out` must be new or empty, and the key file outside it (checked before any work)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new folder (nothing is overwritten)")
    if key_file is not None and out.resolve() in Path(key_file).resolve().parents:
        raise ConfigError(f"the key file {key_file} must not be inside the artifact folder {out}")


def new_folder(out: Path, key_file: Path | None) -> bytes:
    """The sealing key for a new artifact in `out`: read from `key_file` (created when it does not
    exist yet) or $VEIL_SEAL_KEY."""
    check_free(out, key_file)
    if key_file is None:
        return read_key(None)
    return read_key(key_file) if Path(key_file).exists() else write_key(Path(key_file))


def public_config(folder: Path) -> ModelConfig:
    """The architecture an artifact was made for (public; read before anything is unsealed)."""
    return load_config(folder / "device")


def write(out: Path, key: bytes, scheme: str, source: str, hf_config: dict[str, Any],
          tokenizer_folder: Path | None, secrets: dict[str, torch.Tensor], meta: dict[str, Any],
          device_weights: dict[str, torch.Tensor]) -> Path:
    """Write an artifact folder (see the module docstring)."""
    if sum(t.nbytes for t in secrets.values()) > _AESGCM_MAX:
        raise UnsupportedError(f"{scheme}: the enclave's secrets exceed 2 GiB, more than one sealed "
                               f"file holds (a model this large is not a case for {scheme})")
    out = Path(out)
    (out / "device").mkdir(parents=True, exist_ok=True)
    if device_weights:
        save_file(device_weights, str(out / "device" / "model.safetensors"))
    (out / "device" / "config.json").write_text(json.dumps(hf_config, indent=2))
    if tokenizer_folder is not None:
        for name in _TOKENIZER_FILES:
            if (tokenizer_folder / name).is_file():
                shutil.copy(tokenizer_folder / name, out / name)
    meta = {**meta, "device_sha256": (file_sha256(out / "device" / "model.safetensors")
                                      if device_weights else None)}
    (out / "enclave.sealed").write_bytes(seal(secrets, key, f"{scheme}/enclave", meta))
    (out / ARTIFACT).write_text(json.dumps({"scheme": scheme, "format": FORMAT, "source": source},
                                           indent=2))
    return out


def recorded_scheme(folder: Path) -> str:
    """The scheme an artifact was made for (format checked)."""
    try:
        info = json.loads((folder / ARTIFACT).read_text())
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"{folder / ARTIFACT}: malformed ({exc})") from None
    if not isinstance(info, dict) or not isinstance(info.get("scheme"), str):
        raise IntegrityError(f"{folder / ARTIFACT}: no scheme recorded")
    if info.get("format") != FORMAT:
        raise UnsupportedError(f"{folder}: artifact format {info.get('format')!r}; this veil reads "
                               f"format {FORMAT} (protect the model again)")
    return info["scheme"]


@dataclass
class Opened:
    """An artifact's parts after its key opened it."""

    cfg: ModelConfig
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    device_weights: Path | None                          # checked against the sealed digest
    weight_of: Callable[[str], torch.Tensor] | None


def open_sealed(folder: Path, scheme: str, key_file: Path | None) -> Opened:
    """Unseal the enclave's secrets and check the device weights against their sealed digest."""
    key = read_key(key_file)
    sealed = folder / "enclave.sealed"
    if not sealed.is_file():
        raise IntegrityError(f"{folder}: enclave.sealed is missing")
    tensors, meta = unseal(sealed.read_bytes(), key, f"{scheme}/enclave", str(sealed))
    cfg = public_config(folder)
    if meta.get("device_sha256") is None:
        return Opened(cfg, tensors, meta, None, None)
    if not isinstance(meta.get("device_sha256"), str):
        raise IntegrityError(f"{sealed}: no digest of the device weights")
    path = folder / "device" / "model.safetensors"
    # checked against the sealed digest before the enclave reads a byte of it
    reader = SafetensorsReader(path, sha256=meta["device_sha256"])
    return Opened(cfg, tensors, meta, path, reader.weight)
