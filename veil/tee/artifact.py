"""Protected artifacts: `veil protect MODEL --scheme S --out DIR`, and `veil.load(DIR)`.

DIR/device/model.safetensors  everything the untrusted side may hold (masked / obfuscated weights;
                              absent for `shielded`, whose device holds nothing)
DIR/device/config.json        the architecture (public: the attacker knows it anyway)
DIR/enclave.sealed            the enclave's secrets, AES-256-GCM (veil/tee/sealing.py), with the
                              digest of the device weights it was made with (for `shielded`, the
                              whole model)
DIR/tokenizer files           public
DIR/veil-artifact.json        {"scheme": …, "format": 1}
The sealing key never goes into DIR: it comes from a key file outside it or $VEIL_SEAL_KEY.
Nothing runs on unverified secrets: the sealed file is authenticated before it is parsed, and the
device weights are checked against the sealed digest before the enclave uses them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from veil.errors import ConfigError, IntegrityError, UnsupportedError
from veil.model.config import hf_config_dict, load_config
from veil.model.tokenizer import Tokenizer
from veil.model.zoo import file_sha256
from veil.tee.process import SafetensorsReader
from veil.tee.sealing import read_key, seal, unseal, write_key

ARTIFACT = "veil-artifact.json"
FORMAT = 1
PROTECTABLE = ("loro", "tlg", "soter", "nnsplitter", "shadownet", "shielded")
_AESGCM_MAX = (1 << 31) - 1       # the most one AES-GCM call of `cryptography` takes
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json")


def is_artifact(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and (Path(path) / ARTIFACT).is_file()


def _key_for_protect(out: Path, key_file: Path | None) -> bytes:
    if key_file is None:
        return read_key(None)
    key_file = Path(key_file).resolve()
    if out.resolve() in key_file.parents:
        raise ConfigError(f"the key file {key_file} must not be inside the artifact folder {out}")
    return read_key(key_file) if key_file.exists() else write_key(key_file)


def protect(model: str | Path, scheme: str, out: Path, key_file: Path | None = None,
            **options: Any) -> Path:
    """Protect a model for `scheme` into a new folder `out`."""
    from veil.model.opening import open_model

    if scheme not in PROTECTABLE:
        raise UnsupportedError(f"veil protect supports {', '.join(PROTECTABLE)}, not {scheme!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new folder (nothing is overwritten)")
    key = _key_for_protect(out, key_file)
    opened = open_model(model)
    tensors, meta, device_weights = _protect(scheme, opened.cfg, opened.weights, dict(options))
    if sum(t.nbytes for t in tensors.values()) > _AESGCM_MAX:
        raise UnsupportedError(f"{scheme}: the enclave's secrets exceed 2 GiB, more than one sealed "
                               f"file holds (a model this large is not a case for {scheme})")
    (out / "device").mkdir(parents=True, exist_ok=True)
    if device_weights:
        save_file(device_weights, str(out / "device" / "model.safetensors"))
    hf_cfg = (json.loads((opened.folder / "config.json").read_text()) if opened.folder is not None
              else hf_config_dict(opened.cfg))
    (out / "device" / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if opened.folder is not None:
        for name in _TOKENIZER_FILES:
            if (opened.folder / name).is_file():
                shutil.copy(opened.folder / name, out / name)
    meta["device_sha256"] = (file_sha256(out / "device" / "model.safetensors") if device_weights
                             else None)
    (out / "enclave.sealed").write_bytes(seal(tensors, key, f"{scheme}/enclave", meta))
    (out / ARTIFACT).write_text(json.dumps({"scheme": scheme, "format": FORMAT,
                                            "source": opened.source}, indent=2))
    return out


def _protect(scheme: str, cfg, weights, options: dict[str, Any]):
    """(sealable tensors, metadata, device weights) of `scheme`'s offline step."""
    if scheme == "shielded":
        from veil.api import SCHEMES

        SCHEMES["shielded"](cfg, weights, options)      # the same option check as veil.load
        return {f"enclave.{k}": v for k, v in weights.items()}, {}, {}
    if scheme == "loro":
        from veil.tee.runtime import protect_loro

        secrets_, device_weights = protect_loro(cfg, weights, options)
    else:
        from veil.tee.schemes.baselines import protect_baseline_secrets

        secrets_, device_weights = protect_baseline_secrets(scheme, cfg, weights, options)
    tensors, meta = secrets_.to_sealable()
    return tensors, meta, device_weights


def _run(scheme: str, cfg, tensors, meta, device, weight_of, verify: bool):
    """The online enclave of `scheme` from its unsealed secrets."""
    if verify and scheme != "loro":
        raise ConfigError(f"verify (Freivalds checks) is offered for loro, not {scheme!r}")
    if scheme == "shielded":
        from veil.api import SCHEMES

        return SCHEMES["shielded"](cfg, {k.removeprefix("enclave."): v for k, v in tensors.items()}, {})
    if scheme == "loro":
        from veil.tee.runtime import run_loro
        from veil.tee.schemes.loro import LoroSecrets

        return run_loro(cfg, LoroSecrets.from_sealed(tensors, meta), device, weight_of, verify)
    from veil.tee.schemes.baselines import BaselineSecrets, run_baseline

    return run_baseline(cfg, BaselineSecrets.from_sealed(tensors, meta), device)


def load_artifact(folder: Path, scheme: str, options: dict[str, Any]):
    """Run a protected artifact: unseal the enclave's secrets, check the device weights, start
    the device (its own process by default), return a `Model`."""
    from veil.api import Model
    from veil.model.ops import check_support

    try:
        info = json.loads((folder / ARTIFACT).read_text())
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"{folder / ARTIFACT}: malformed ({exc})") from None
    recorded = info.get("scheme")
    if recorded not in PROTECTABLE or info.get("format") != FORMAT:
        raise UnsupportedError(f"{folder}: artifact for scheme {recorded!r}, format {info.get('format')!r}")
    if scheme not in ("plain", recorded):  # "plain" is load()'s default: take the recorded scheme
        raise ConfigError(f"{folder} was protected for {recorded!r}, not {scheme!r}")
    options = dict(options)
    key = read_key(options.pop("key_file", None))
    sealed = folder / "enclave.sealed"
    if not sealed.is_file():
        raise IntegrityError(f"{folder}: enclave.sealed is missing")
    tensors, meta = unseal(sealed.read_bytes(), key, f"{recorded}/enclave", str(sealed))
    cfg = load_config(folder / "device")
    from veil.tee.runtime import DEVICE_OPTIONS, start_device

    verify = bool(options.pop("verify", False))
    device_options = {k: options.pop(k) for k in list(options) if k in DEVICE_OPTIONS}
    if options:
        raise ConfigError(f"unknown options for a protected artifact: {sorted(options)}")
    device, weight_of = None, None
    if recorded != "shielded":
        weights_path = folder / "device" / "model.safetensors"
        if not isinstance(meta.get("device_sha256"), str):
            raise IntegrityError(f"{sealed}: no digest of the device weights")
        # checked against the sealed digest before the enclave reads a byte of it
        weight_of = SafetensorsReader(weights_path, sha256=meta["device_sha256"]).weight
        device, _ = start_device(weights_path, device_options, default_mode="process")
    ops = _run(recorded, cfg, tensors, meta, device, weight_of, verify)
    check_support(ops, cfg)
    tokenizer = Tokenizer(folder) if Tokenizer.present(folder) else None
    return Model(cfg, ops, recorded, tokenizer, str(folder))
