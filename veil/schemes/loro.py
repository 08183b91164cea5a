"""`loro`: LoRO (NeurIPS'25) — the weights on the untrusted device under low-rank dense masks, the
enclave removing them cheaply. Protocol, threat model and deviations from the paper:
veil/tee/schemes/loro.py; the runtime: veil/tee/runtime.py."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from veil.backends.plain import TorchOps
from veil.errors import ConfigError
from veil.model.opening import OpenedModel
from veil.tee.artifact import Opened
from veil.schemes.base import Placement, Protected, Scheme, Tolerance
from veil.schemes.tee import DeviceOptions, TeeSession, start_session
from veil.tee.runtime import protect_loro, run_loro
from veil.tee.schemes.loro import LoroConfig, LoroSecrets


@dataclass(frozen=True)
class LoroRunOptions(DeviceOptions):
    """What running LoRO takes (an artifact too): the device's options, Freivalds checks of every
    device result, fresh attention mixings per conversation (off: the sealed ones, reused by
    every conversation, as the paper's code does), and the dtype of the pads' products g·W'ᵀ
    (float32 by default: half the bytes of float64 stored on, fetched from and opened off the
    device, at about twice float64's logit error — both measured in benchmarks/results/tee.md)."""

    verify: bool = False
    fresh_mixing: bool = True
    pad_products: Literal["float32", "float64"] = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pad_products not in ("float32", "float64"):
            raise ConfigError("option 'pad_products' must be 'float32' or 'float64', got "
                              f"{self.pad_products!r}")

    @property
    def pad_dtype(self) -> torch.dtype:
        return torch.float32 if self.pad_products == "float32" else torch.float64


@dataclass(frozen=True)
class LoroOptions(LoroConfig, LoroRunOptions):
    """The protection's settings (LoroConfig: rank, bank, mask_ratio, pad_ratio, pads,
    attention_mixing, mask, prior) and the run's."""

    def __post_init__(self) -> None:
        LoroConfig.__post_init__(self)
        LoroRunOptions.__post_init__(self)

    def config(self) -> LoroConfig:
        return LoroConfig(**{f.name: getattr(self, f.name) for f in fields(LoroConfig)})


def _open(opened: OpenedModel, o: LoroOptions) -> TeeSession:
    mode = o.mode("thread", "loro", opened.weights)
    lcfg = o.config()
    secrets_, device_weights = protect_loro(opened.cfg, opened.weights, lcfg)
    return start_session(
        "loro", opened.cfg, o, mode, device_weights, secrets_,
        lambda device, weight_of: run_loro(opened.cfg, secrets_, lcfg, device, weight_of,
                                           o.verify, o.fresh_mixing, o.pad_dtype), owned=False)


def _protect(opened: OpenedModel, o: LoroOptions) -> Protected:
    secrets_, device_weights = protect_loro(opened.cfg, opened.weights, o.config())
    return Protected(secrets_, device_weights)


def _open_protected(art: Opened, o: LoroRunOptions) -> TeeSession:
    lcfg = LoroConfig(**art.meta["config"])
    mode = o.mode("process", "loro")
    secrets_ = LoroSecrets.from_sealed(art.tensors, art.meta)
    # the enclave reads the weights it verified against the sealed digest, not the device's copy
    return start_session(
        "loro", art.cfg, o, mode, art.device_weights, secrets_,
        lambda device, _: run_loro(art.cfg, secrets_, lcfg, device, art.weight_of, o.verify,
                                   o.fresh_mixing, o.pad_dtype),
        owned=True)


# the enclave runs norms, activations and RoPE itself (any of plain's); the device's attention is
# softmax attention, and generation is the standard loop
SUPPORT = {**TorchOps.support, "norm": frozenset({"rms", "layer"}),
           "activation": frozenset({"silu", "gelu", "gelu_tanh"}),
           "attention": frozenset({"softmax"}), "generation": frozenset({"standard"})}

LORO = Scheme(
    name="loro", system="LoRO (NeurIPS'25)", protects="model weights", trusted="the TEE",
    sees="W + γ(BA)ᵀ; activations + one-time pads; Q/K/V and the KV cache under secret "
         "head-block orthogonal transforms; token ids (embedding lookups)",
    kind="tee", status="**implemented**; as published, a model fine-tuned from a public prior "
           "is **not** protected: the low-rank peel (veil/attacks/steal.py) returns the whole "
           "fine-tune with no queries; veil's hardenings (`mask=delta|offload`) cut that to the "
           "delta beyond rank r, and a LoRA fine-tune under `mask=offload` leaves the device the "
           "public prior only — see [docs/attacks.md](docs/attacks.md)",
    options=LoroOptions, artifact_options=LoroRunOptions,
    support=SUPPORT,
    # the device's float32 products carry terms ~(1+mask_ratio)(1+pad_ratio) ≈ 42× larger than
    # the result: ~1e-5 on the tiny presets; on the default model 1.7e-3–5.9e-3 over draws of
    # the secrets and prompts (benchmarks/results/loro_error.md), so 1e-2 leaves a margin over
    # the tail rather than over one draw (5e-3 failed one draw in CI)
    tolerance=Tolerance(tiny=1e-4, default=1e-2),
    open=_open, protect=_protect, open_protected=_open_protected,
    placement=(
        Placement("embedding lookup", "device + enclave", "token ids", "E' = E + γ(BA)ᵀ",
                  "token ids (LoRO protects the weights, not the user's input)",
                  holds=("embed.weight", "pos_embed.weight"), receives=("rows:*",)),
        Placement("norms", "enclave", "—", "—"),
        Placement("q/k/v, o, gate/up, down", "device + enclave",
                  "x + s·g (one-time pad g, s = pad_ratio·RMS(x) rounded up to 2ᵏ)",
                  "W' = W + γ(BA)ᵀ",
                  "each row's RMS within a factor of 2; and, for a model fine-tuned from a "
                  "public prior, the fine-tune itself: W' − W_prior's top singular directions "
                  "are the rank-8 mask, and peeling them (veil/attacks/steal.py, no queries) "
                  "stole a 200-step Shakespeare fine-tune of the default model whole (held-out "
                  "ppl: prior 66.6, victim 40.8, stolen 40.8; the whole top-1 gain — "
                  "benchmarks/results/stealing.md); the shared factor bank lets 4 matrices' "
                  "peels predict any other's mask subspace (100%). mask='delta' (rank 8/32/128) "
                  "leaves 48%/23%/13% of the gain to a zero-query attacker, but with 10% of the "
                  "data as queries an attacker still beats a query-only copy (docs/attacks.md)",
                  holds=("layers.*.weight",), receives=("linear:*layers.*",)),
        Placement("pad products g·W'ᵀ (made offline)", "enclave (seal, open)",
                  "sealed rows to store (offline); it returns them with the linear request "
                  "using them", "AES-GCM-sealed rows (pads.<name>), one per matrix and pad row",
                  holds=("pads.*",)),
        Placement("low-rank correction, pad removal, biases", "enclave", "—", "—"),
        Placement("RoPE", "enclave", "—", "—"),
        Placement("attention", "device", "Q, K, V under secret head-block orthogonal transforms",
                  "the KV cache under the same transforms",
                  "the conversation: each head's norm survives a rotation, and layer 0's value "
                  "norms identify every token (veil/attacks/kv_inversion.py: 100% of 50 held-out "
                  "windows on the default model; a fine-tuned model, the public prior's tables "
                  "and 8 known tokens: 100%)",
                  holds=("kv_cache.*",), receives=("attention:*",)),
        Placement("activation, residual adds", "enclave", "—", "—"),
        Placement("LM head", "device + enclave", "h + s·g", "E' (tied) or W'_head",
                  holds=("lm_head.weight",), receives=("linear:*'embed'*", "linear:*lm_head*")),
    ))
