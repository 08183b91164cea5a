"""`veil protect` and `veil.load(DIR)` for any scheme that can protect a model into an artifact
(the format: veil/tee/artifact.py)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from veil.errors import ConfigError, UnsupportedError
from veil.model.config import hf_config_dict
from veil.model.opening import open_model
from veil.model.ops import check_support
from veil.model.tokenizer import Tokenizer
from veil.schemes import SCHEMES, get
from veil.schemes.base import Scheme, Session
from veil.tee import artifact


def protectable() -> list[str]:
    return [s.name for s in SCHEMES.values() if s.protect is not None]


def _protecting(scheme: str) -> Scheme:
    s = get(scheme)
    if s.protect is None or s.open_protected is None:
        raise UnsupportedError(f"veil protect supports {', '.join(protectable())}, not {scheme!r}")
    return s


def protect(model: str | Path, scheme: str, out: Path, key_file: Path | None = None,
            **options: Any) -> Path:
    """Protect a model for `scheme` into a new folder `out`. The scheme's public settings (its
    options but the run-time ones) are sealed with its secrets, so loading needs only the key."""
    s = _protecting(scheme)
    run_time = {f.name for f in fields(s.artifact_options)}
    if set(options) & run_time:
        raise ConfigError(f"{scheme}: {sorted(set(options) & run_time)} are chosen when the "
                          "artifact is loaded, not when it is protected")
    opts = s.options.parse(scheme, options)
    artifact.check_free(Path(out), key_file)
    opened = open_model(model)
    check_support(s.support, opened.cfg, f"scheme {scheme!r}")
    if s.check_model is not None:
        s.check_model(opened.cfg)
    key = artifact.new_folder(Path(out), key_file)      # the key file is made only now
    p = s.protect(opened, opts)
    tensors, meta = p.secrets.to_sealable()
    meta = {**meta, "config": {f.name: getattr(opts, f.name) for f in fields(opts)
                               if f.name not in run_time}}
    hf_cfg = (json.loads((opened.folder / "config.json").read_text()) if opened.folder is not None
              else hf_config_dict(opened.cfg))
    return artifact.write(Path(out), key, scheme, opened.source, hf_cfg, opened.folder, tensors,
                          meta, p.device_weights)


def open_artifact(folder: Path, scheme: str, options: dict[str, Any]
                  ) -> tuple[Session, Tokenizer | None]:
    """Run a protected artifact: unseal the enclave's secrets, check the device weights, start
    the device (its own process by default). `scheme` "plain" (load's default) means the one
    recorded; any other must match it. Options: `key_file` and the scheme's run-time options."""
    recorded = artifact.recorded_scheme(folder)
    s = _protecting(recorded)
    if scheme not in ("plain", recorded):
        raise ConfigError(f"{folder} was protected for {recorded!r}, not {scheme!r}")
    options = dict(options)
    key_file = options.pop("key_file", None)
    opts = s.artifact_options.parse(f"{recorded} artifact", options)
    check_support(s.support, artifact.public_config(folder), f"scheme {recorded!r}")
    opened = artifact.open_sealed(folder, recorded, Path(key_file) if key_file else None)
    session = s.open_protected(opened, opts)
    return session, (Tokenizer(folder) if Tokenizer.present(folder) else None)
