"""The wire format between enclave and device: a small JSON header plus raw tensor bytes. No pickle.

Frame layout (all integers little-endian):
    b"VEIL"  u8 version  u32 header_len  header (UTF-8 JSON object)  payload (raw tensor bytes)
The header names the op, carries scalar arguments, and describes each tensor of the payload by
dtype and shape; the payload length follows from them. Everything is checked before it is used:
a frame that is malformed, too large, or of an unknown dtype raises `ProtocolAbort`, so a peer that
sends garbage ends the run with a clear error instead of a crash deep inside numpy or torch.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from veil.errors import ProtocolAbort

MAGIC = b"VEIL"
VERSION = 1
PREFIX = struct.Struct("<4sBI")  # magic, version, header length
MAX_HEADER = 1 << 16
MAX_PAYLOAD = 1 << 32
MAX_TENSORS = 64
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64,
           "int32": torch.int32, "bool": torch.bool, "uint8": torch.uint8}
_NAMES = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in _DTYPES.items()}


@dataclass
class Message:
    """One frame: an op name, JSON-safe scalar arguments, and tensors."""

    op: str
    args: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)


def encode(msg: Message, max_header: int = MAX_HEADER) -> bytes:
    """Serialise a message into one frame."""
    descs, blobs = [], []
    for t in msg.tensors:
        name = _NAMES.get(t.dtype)
        if name is None:
            raise ProtocolAbort(f"cannot send a tensor of dtype {t.dtype}")
        arr = t.detach()
        if arr.device.type != "cpu" or not arr.is_contiguous():
            arr = arr.contiguous().cpu()
        descs.append({"dtype": name, "shape": list(arr.shape)})
        if arr.numel():
            blobs.append(arr.numpy().data)      # the tensor's own bytes, copied once by join
    header = json.dumps({"op": msg.op, "args": msg.args, "tensors": descs},
                        separators=(",", ":")).encode()
    if len(header) > max_header:
        raise ProtocolAbort(f"header of {len(header)} bytes exceeds {max_header}")
    return b"".join([PREFIX.pack(MAGIC, VERSION, len(header)), header, *blobs])


def parse_prefix(prefix: bytes, max_header: int = MAX_HEADER) -> int:
    """Check the fixed prefix; returns the header length."""
    magic, version, header_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolAbort(f"peer sent a frame with bad magic {magic!r}")
    if version != VERSION:
        raise ProtocolAbort(f"peer speaks wire version {version}, expected {VERSION}")
    if header_len > max_header:
        raise ProtocolAbort(f"peer announced a {header_len}-byte header (limit {max_header})")
    return header_len


def parse_header(raw: bytes, max_tensors: int = MAX_TENSORS
                 ) -> tuple[dict[str, Any], list[tuple[torch.dtype, tuple[int, ...], int]]]:
    """Validate a header; returns it with (dtype, shape, nbytes) per tensor."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolAbort(f"peer sent a malformed header ({exc})") from None
    if (not isinstance(header, dict) or not isinstance(header.get("op"), str)
            or not isinstance(header.get("args"), dict) or not isinstance(header.get("tensors"), list)):
        raise ProtocolAbort("peer sent a header without op/args/tensors")
    if len(header["tensors"]) > max_tensors:
        raise ProtocolAbort(f"peer sent {len(header['tensors'])} tensors (limit {max_tensors})")
    specs, total = [], 0
    for d in header["tensors"]:
        name = d.get("dtype") if isinstance(d, dict) else None
        dtype = _DTYPES.get(name) if isinstance(name, str) else None
        shape = d.get("shape") if isinstance(d, dict) else None
        if dtype is None or not isinstance(shape, list) or not all(
                type(s) is int and 0 <= s < MAX_PAYLOAD for s in shape):
            raise ProtocolAbort(f"peer sent an invalid tensor description {d!r}")
        nbytes = math.prod(shape) * _ITEMSIZE[name]
        total += nbytes
        if total > MAX_PAYLOAD:
            raise ProtocolAbort(f"peer announced more than {MAX_PAYLOAD} payload bytes")
        specs.append((dtype, tuple(shape), nbytes))
    return header, specs


def tensors_from(payload: bytes | bytearray,
                 specs: list[tuple[torch.dtype, tuple[int, ...], int]]) -> list[torch.Tensor]:
    """Tensors over the payload. A bytearray (the channel's own receive buffer, one per message)
    is shared, not copied; immutable bytes are copied once."""
    if not isinstance(payload, bytearray):
        payload = bytearray(payload)
    out, offset = [], 0
    for dtype, shape, nbytes in specs:
        if nbytes == 0:
            out.append(torch.empty(shape, dtype=dtype))
        else:
            out.append(torch.frombuffer(payload, dtype=dtype, count=math.prod(shape),
                                        offset=offset).view(shape))
        offset += nbytes
    return out


def decode(frame: bytes, max_header: int = MAX_HEADER, max_tensors: int = MAX_TENSORS) -> Message:
    """Parse one complete frame. Sealed files (authenticated before parsing) pass larger limits."""
    if len(frame) < PREFIX.size:
        raise ProtocolAbort("truncated frame")
    header_len = parse_prefix(frame[:PREFIX.size], max_header)
    raw = frame[PREFIX.size:PREFIX.size + header_len]
    if len(raw) < header_len:
        raise ProtocolAbort("truncated frame header")
    header, specs = parse_header(raw, max_tensors)
    payload = frame[PREFIX.size + header_len:]
    if len(payload) != sum(n for _, _, n in specs):
        raise ProtocolAbort(f"frame payload has {len(payload)} bytes, header announced "
                            f"{sum(n for _, _, n in specs)}")
    return Message(header["op"], header["args"], tensors_from(payload, specs))
