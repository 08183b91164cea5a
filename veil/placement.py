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
    Placement("pad products g·W'ᵀ (made offline)", "enclave (seal, open)",
              "sealed rows to store (offline); it returns them with the linear request using them",
              "AES-GCM-sealed rows (pads.<name>), one per matrix and pad row"),
    Placement("low-rank correction, pad removal, biases", "enclave", "—", "—"),
    Placement("RoPE", "enclave", "—", "—"),
    Placement("attention", "device", "Q, K, V under secret head-block orthogonal transforms",
              "the KV cache under the same transforms"),
    Placement("activation, residual adds", "enclave", "—", "—"),
    Placement("LM head", "device + enclave", "h + s·g", "E' (tied) or W'_head"),
]

_ENCLAVE_SIDE = [
    Placement("embedding, norms, activations, residual adds, LM head", "enclave", "—", "—"),
]


def _baseline(linear_receives: str, holds: str, leaks: str, attention_on_device: bool) -> list[Placement]:
    rows = _ENCLAVE_SIDE + [Placement("q/k/v, o, gate/up, down", "device + enclave",
                                      linear_receives, holds, leaks)]
    if attention_on_device:
        rows.append(Placement("attention", "device", "Q, K, V under head/feature permutations",
                              "the KV cache, permuted",
                              "permutations only: undone by matching against the public prior (MSP)"))
    else:
        rows.append(Placement("attention (and the KV cache)", "enclave", "—", "—"))
    return rows


PLACEMENTS: dict[str, list[Placement]] = {
    "plain": _PLAIN,
    "loro": _LORO,
    "shielded": [Placement("everything", "enclave", "—", "—")],
    "tlg": _baseline("x with features permuted", "W[π_out][:, π_in]",
                     "weights up to permutations: undone by MSP", True),
    "soter": _baseline("x in the clear (a share of layers stays in the enclave)", "μ·W",
                       "inputs in the clear; weights up to one scalar per matrix", False),
    "nnsplitter": _baseline("x in the clear", "W + Δ (Δ on the 1% largest weights)",
                            "inputs in the clear; 99% of the weights exactly", False),
    "shadownet": _baseline("x with features permuted", "diag(s)·W[π_out][:, π_in]",
                           "weights up to scale and permutation: undone by MSP + rescaling", False),
    # MPC: the "untrusted side" is each peer; what it receives is shares and opened masked values
    "mpc": [
        Placement("embedding (one-hot × table), forward, LM head, argmax", "all parties (shares)",
                  "shares of the weights / the prompt; masked values opened by the protocol",
                  "its shares of the weights and of the KV cache",
                  "semi2k: rank 0 (the owner) is SPU's trusted dealer and could unmask everything — "
                  "use cheetah or aby3 against a distrusting owner"),
        Placement("shape of the run", "public", "prompt length, number of new tokens", "—",
                  "the lengths (the output length is fixed by the client's request)"),
        Placement("generated token ids (reveal='logits': each step's logits; the client "
                  "takes the argmax and inputs its pick as a fresh secret)", "client",
                  "the other parties' shares of each token id (or logit vector)", "—"),
    ],
    # MERGE: the same protocol on a changed model; what changes is what runs under MPC
    "merge": [
        Placement("attention table softmax (constant attention)", "owner, in plaintext",
                  "—", "—", ""),
        Placement("prompt embedding (one-hot × table), layers (V·table mixing, linears, quad, "
                  "norm), resent states", "all parties (shares)",
                  "shares of the weights, the softmaxed tables and the prompt; masked values "
                  "opened by the protocol",
                  "its shares of the weights, of each layer's value cache and of the kept states",
                  "semi2k: rank 0 (the owner) is SPU's trusted dealer and could unmask everything — "
                  "use cheetah or aby3 against a distrusting owner"),
        Placement("LM head + argmax, once after the loop", "all parties (shares)",
                  "masked values opened by the protocol", "—", ""),
        Placement("shape of the run", "public", "prompt length, number of new tokens", "—",
                  "the lengths (the output length is fixed by the client's request)"),
        Placement("generated token ids (reveal='logits', MERGE's own ending: the head's "
                  "logits, which the client decodes)", "client",
                  "the other parties' shares of the token ids (or logits), all at the end", "—"),
    ],
}


def placement(scheme: str) -> list[Placement]:
    if scheme not in PLACEMENTS:
        raise UnsupportedError(f"no placement for scheme {scheme!r} (known: {', '.join(PLACEMENTS)})")
    return PLACEMENTS[scheme]
