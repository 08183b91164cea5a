"""Sealed storage of enclave secrets: AES-256-GCM, as a real enclave seals data at rest.

Layout of a sealed file: b"VEILSEAL" u8 version, 12-byte nonce, then the AES-GCM ciphertext+tag of
a payload that is itself a wire frame (veil/tee/wire.py: JSON header + raw tensors; no pickle).
The associated data binds the file's purpose (e.g. "loro/enclave"), so a sealed blob cannot be
swapped for one made for another scheme. Tampering, truncation or the wrong key → `IntegrityError`,
and nothing is parsed before the tag verifies.

Key: 32 bytes, from a key file (raw or hex) or the environment variable VEIL_SEAL_KEY (hex).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.csprng import new_key
from veil.errors import ConfigError, IntegrityError, ProtocolAbort
from veil.tee.wire import Message, decode, encode

MAGIC = b"VEILSEAL"
VERSION = 1
KEY_ENV = "VEIL_SEAL_KEY"
# a sealed file holds every secret tensor of a model (hundreds); it is authenticated before parsing
_SEALED_LIMITS = {"max_header": 1 << 26, "max_tensors": 1 << 20}


def write_key(path: Path) -> bytes:
    """Create a new key file (mode 600) and return the key."""
    key = new_key()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def read_key(path: Path | None = None) -> bytes:
    """The sealing key from `path`, else from $VEIL_SEAL_KEY."""
    if path is not None:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the sealing key file {path} ({exc.strerror})") from None
        text = raw.strip()
        key = raw if len(raw) == 32 else _from_hex(text.decode("ascii", "replace"), str(path))
    elif os.environ.get(KEY_ENV):
        key = _from_hex(os.environ[KEY_ENV].strip(), f"${KEY_ENV}")
    else:
        raise ConfigError(f"no sealing key: pass a key file or set {KEY_ENV} (64 hex digits)")
    return key


def _from_hex(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{where}: the sealing key must be 32 bytes as 64 hex digits") from None
    if len(key) != 32:
        raise ConfigError(f"{where}: the sealing key must be 32 bytes, got {len(key)}")
    return key


def seal(tensors: dict[str, torch.Tensor], key: bytes, purpose: str,
         meta: dict | None = None) -> bytes:
    """Encrypt named tensors (and JSON-safe metadata) for `purpose`."""
    names = list(tensors)
    frame = encode(Message(purpose, {"names": names, "meta": meta or {}}, [tensors[n] for n in names]),
                   max_header=_SEALED_LIMITS["max_header"])
    nonce = os.urandom(12)
    header = MAGIC + bytes([VERSION])
    return header + nonce + AESGCM(key).encrypt(nonce, frame, header + purpose.encode())


def unseal(blob: bytes, key: bytes, purpose: str, source: str = "sealed data") -> tuple[dict[str, torch.Tensor], dict]:
    """Decrypt and verify; returns (tensors, metadata). Any tampering raises `IntegrityError`."""
    header = MAGIC + bytes([VERSION])
    if len(blob) < len(header) + 12 + 16 or not blob.startswith(MAGIC):
        raise IntegrityError(f"{source}: not a veil sealed file, or truncated")
    if blob[:len(header)] != header:
        raise IntegrityError(f"{source}: sealed with an unknown format version {blob[len(MAGIC)]}")
    nonce, body = blob[len(header):len(header) + 12], blob[len(header) + 12:]
    try:
        frame = AESGCM(key).decrypt(nonce, body, header + purpose.encode())
    except InvalidTag:
        raise IntegrityError(f"{source}: authentication failed (tampered, truncated, wrong key, "
                             f"or sealed for another purpose than {purpose!r})") from None
    try:
        msg = decode(frame, **_SEALED_LIMITS)
    except ProtocolAbort as exc:  # authentic but unparsable: a bug on the sealing side
        raise IntegrityError(f"{source}: authentic but malformed content ({exc})") from None
    names = msg.args.get("names", [])
    if msg.op != purpose or len(names) != len(msg.tensors):
        raise IntegrityError(f"{source}: content does not match its purpose {purpose!r}")
    return dict(zip(names, msg.tensors)), msg.args.get("meta", {})
