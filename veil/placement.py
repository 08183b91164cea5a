"""Placement as data: for each op of the forward, where it runs and what the untrusted side sees.

`veil explain --scheme S` prints a scheme's table; tests check it against the device view.
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.errors import UnsupportedError


@dataclass(frozen=True)
class Placement:
    op: str
    runs_on: str            # host | enclave | device | device + enclave
    device_receives: str    # what crosses the boundary for this op ("—" if nothing)
    device_holds: str       # what stays resident on the untrusted side for this op
    leaks: str = ""         # non-empty: what this placement gives away (flagged by `explain`)


_PLAIN = [Placement("everything", "host", "—", "—", "no protection: the host sees all")]

_LORO = [
    Placement("embedding lookup", "device + enclave", "token ids", "E' = E + γ(BA)ᵀ",
              "token ids (LoRO protects the weights, not the user's input)"),
    Placement("norms", "enclave", "—", "—"),
    Placement("q/k/v, o, gate/up, down", "device + enclave",
              "x + s·g (one-time pad g, s = pad_ratio·RMS(x) rounded up to 2ᵏ)", "W' = W + γ(BA)ᵀ",
              "each row's RMS within a factor of 2"),
    Placement("low-rank correction, pad removal, biases", "enclave", "—", "—"),
    Placement("RoPE", "enclave", "—", "—"),
    Placement("attention", "device", "Q, K, V under secret head-block orthogonal transforms",
              "the KV cache under the same transforms"),
    Placement("activation, residual adds", "enclave", "—", "—"),
    Placement("LM head", "device + enclave", "h + s·g", "E' (tied) or W'_head"),
]

PLACEMENTS: dict[str, list[Placement]] = {"plain": _PLAIN, "loro": _LORO}


def placement(scheme: str) -> list[Placement]:
    if scheme not in PLACEMENTS:
        raise UnsupportedError(f"no placement for scheme {scheme!r} (known: {', '.join(PLACEMENTS)})")
    return PLACEMENTS[scheme]
