"""`kvshield`: KV-Shield (MobiArch'24) — the conversation in the untrusted device's KV cache kept
under secret per-conversation transforms, the enclave undoing them. Protocol, the paper's gaps
and what it does not hide: veil/tee/schemes/kvshield.py; the attacks: veil/attacks/kv_inversion.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from veil.backends.plain import TorchOps
from veil.errors import ConfigError
from veil.model.config import ModelConfig
from veil.model.opening import OpenedModel
from veil.schemes.base import Placement, Protected, Scheme, Tolerance
from veil.schemes.tee import DeviceOptions, TeeSession, start_session
from veil.tee.artifact import Opened
from veil.tee.schemes.kvshield import KvShieldSecrets, protect_kvshield, run_kvshield


@dataclass(frozen=True)
class KvShieldOptions(DeviceOptions):
    """mixing: the head-block transform (permute: the paper's RPM; rotate; padded: each head
    vector extended by `pad_width` secret dimensions — noise in K and V — before a rotation);
    pad_width: the added dimensions (default: the head dimension); pad_scale: the pad's standard
    deviation as a multiple of the layer's own K/V rms (default 4: at 1, eight known tokens
    read 62% of a chat back by inner products); fold: the transform folded
    into the device's W_q/W_k/W_v as in the paper (permute or rotate; RoPE models then get the
    RoPE-commuting family). All are drawn anew per conversation, so an artifact takes them at
    load time."""

    mixing: Literal["permute", "rotate", "padded"] = "padded"
    pad_width: int | None = None
    pad_scale: float | None = None
    fold: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fold and self.mixing == "padded":
            raise ConfigError("kvshield: fold=true takes mixing 'permute' or 'rotate' (a "
                              "per-token pad cannot be folded into weights)")
        for name in ("pad_width", "pad_scale"):
            if getattr(self, name) is not None and self.mixing != "padded":
                raise ConfigError(f"kvshield: option {name!r} needs mixing='padded', "
                                  f"not {self.mixing!r}")
        if self.pad_width is not None and self.pad_width < 1:
            raise ConfigError(f"kvshield: option 'pad_width' must be ≥ 1, got {self.pad_width}")
        if self.pad_scale is not None and not 0 < self.pad_scale <= 1e3:
            raise ConfigError(f"kvshield: option 'pad_scale' must be in (0, 1000], got {self.pad_scale}")

    def width(self, cfg: ModelConfig) -> int:
        if self.mixing != "padded":
            return 0
        return self.pad_width if self.pad_width is not None else cfg.head_dim

    def scale(self) -> float:
        return self.pad_scale if self.pad_scale is not None else 4.0


def _open(opened: OpenedModel, o: KvShieldOptions) -> TeeSession:
    mode = o.mode("thread", "kvshield", opened.weights)
    secrets_, device_weights = protect_kvshield(opened.cfg, opened.weights)
    return start_session(
        "kvshield", opened.cfg, o, mode, device_weights, secrets_,
        lambda device, weight_of: run_kvshield(opened.cfg, secrets_, o.mixing, o.width(opened.cfg),
                                               o.scale(), o.fold, device, weight_of), owned=False)


def _protect(opened: OpenedModel, o: KvShieldOptions) -> Protected:
    secrets_, device_weights = protect_kvshield(opened.cfg, opened.weights)
    return Protected(secrets_, device_weights)


def _open_protected(art: Opened, o: KvShieldOptions) -> TeeSession:
    mode = o.mode("process", "kvshield")
    secrets_ = KvShieldSecrets.from_sealed(art.tensors, art.meta)
    return start_session(
        "kvshield", art.cfg, o, mode, art.device_weights, secrets_,
        lambda device, _: run_kvshield(art.cfg, secrets_, o.mixing, o.width(art.cfg), o.scale(),
                                       o.fold,
                                       device, art.weight_of), owned=True)


# the device runs the norms and activations from the HF config.json it is sent, which has no
# place for Power-Softmax's polynomial coefficients
SUPPORT = {**TorchOps.support, "attention": frozenset({"softmax"}),
           "norm": TorchOps.support["norm"] - {"poly"},
           "activation": TorchOps.support["activation"] - {"poly"},
           "generation": frozenset({"standard"})}

KVSHIELD = Scheme(
    name="kvshield", system="KV-Shield (MobiArch'24)", protects="the conversation (KV cache)",
    trusted="the TEE",
    sees="the public weights; the token embeddings and the hidden states in the clear; Q/K/V "
         "and the KV cache under per-conversation head-block transforms (padded by default)",
    kind="tee", status="**implemented**: exact in every mode; the paper's permutation (and plain "
           "rotations) read back 100% from a cache snapshot; the padded default 3.4% by the "
           "best attack in veil; a device that records its inputs reads 100% in every mode — "
           "see [docs/kvshield.md](docs/kvshield.md)", options=KvShieldOptions,
    artifact_options=KvShieldOptions, support=SUPPORT,
    tolerance=Tolerance(tiny=1e-4, default=1e-3),
    open=_open, protect=_protect, open_protected=_open_protected,
    placement=(
        Placement("embedding lookup", "enclave", "—", "—"),
        Placement("norms, q/k/v, RoPE, o, gate/up, down, activations, residual adds, LM head",
                  "device", "each forward's token embeddings E[t] (+ position rows), and each "
                  "layer's attention output after the enclave un-transforms it",
                  "the public weights (fold: W_q/W_k/W_v and biases with the transform folded "
                  "in, re-sent per conversation), the forward's live values",
                  "the conversation: the embedding rows are the tokens (veil/attacks/"
                  "kv_inversion.py `inputs`: 100%); so are the live residual stream values",
                  holds=("layers.*", "final_norm.*", "embed.weight", "lm_head.weight", "value.*"),
                  receives=("program:embeds:*", "program:pos_embeds:*", "program:attn_out:*",
                            "program:positions:*")),
        Placement("head-block transform of q/k/v (not fold: fetched back, transformed, "
                  "padded), un-transform of the attention output", "enclave", "—", "—"),
        Placement("attention", "device", "Q, K, V under per-conversation head-block transforms",
                  "the KV cache under the same transforms",
                  "permute (the paper's RPM) and rotate, folded or not: every token of 50 "
                  "held-out windows (sorted entries, per-head norms, W'·W⁺); padded (default, "
                  "pad_scale 4): the best attack (8 known tokens) reads 3.4% — 2.2% of 512-token "
                  "conversations; at pad_scale 1: 72% / 99.6% (docs/kvshield.md)",
                  holds=("kv_cache.*",), receives=("program:attention:*",)),
    ))
