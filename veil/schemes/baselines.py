"""The earlier TEE-shielded schemes LoRO is measured against — `tlg`, `soter`, `nnsplitter`,
`shadownet` — on the same split runtime (veil/tee/schemes/baselines.py says what each hides and
how). One module, four registered schemes: they differ in their transform, their options and what
their device sees."""

from __future__ import annotations

from dataclasses import dataclass

from veil.backends.plain import TorchOps
from veil.errors import ConfigError
from veil.model.opening import OpenedModel
from veil.tee.artifact import Opened
from veil.schemes.base import Placement, Protected, Scheme, Tolerance
from veil.schemes.tee import DeviceOptions, TeeSession, start_session
from veil.tee.schemes.baselines import BaselineSecrets, protect_baseline_secrets, run_baseline


@dataclass(frozen=True)
class BaselineOptions(DeviceOptions):
    """enclave_share: the share of the layers' linear groups computed in the enclave instead."""

    enclave_share: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.enclave_share <= 1.0:
            raise ConfigError(f"option 'enclave_share' must be in [0, 1], got {self.enclave_share}")

    def noised_fraction(self) -> float:
        """The share of weights the transform adds noise to (nnsplitter's only)."""
        return 0.0


@dataclass(frozen=True)
class SoterOptions(BaselineOptions):
    """SOTER keeps part of the model inside the enclave: 20% of the linear groups by default."""

    enclave_share: float = 0.2


@dataclass(frozen=True)
class NNSplitterOptions(BaselineOptions):
    """mask_fraction: the share of largest-magnitude weights that get noise."""

    mask_fraction: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mask_fraction <= 1.0:
            raise ConfigError(f"option 'mask_fraction' must be in (0, 1], got {self.mask_fraction}")

    def noised_fraction(self) -> float:
        return self.mask_fraction


@dataclass(frozen=True)
class TlgRunOptions(DeviceOptions):
    """fresh_mixing: new head-block permutations for every conversation (off: the sealed ones,
    reused by every conversation)."""

    fresh_mixing: bool = True


@dataclass(frozen=True)
class TlgOptions(BaselineOptions, TlgRunOptions):
    """TLG's options: the baselines' and fresh_mixing."""


def _fresh(o: DeviceOptions) -> bool:
    return isinstance(o, TlgRunOptions) and o.fresh_mixing


def _schemes(name: str, system: str, options: type[BaselineOptions], sees: str,
             linear_receives: str, holds: str, leaks: str, attention_on_device: bool,
             run_options: type[DeviceOptions] = DeviceOptions) -> Scheme:
    def protect(opened: OpenedModel, o: BaselineOptions) -> Protected:
        secrets_, device_weights = protect_baseline_secrets(
            name, opened.cfg, opened.weights, o.enclave_share, o.noised_fraction())
        return Protected(secrets_, device_weights)

    def open_(opened: OpenedModel, o: BaselineOptions) -> TeeSession:
        mode = o.mode("thread", name, opened.weights)
        secrets_, device_weights = protect_baseline_secrets(
            name, opened.cfg, opened.weights, o.enclave_share, o.noised_fraction())
        return start_session(name, opened.cfg, o, mode, device_weights, secrets_,
                             lambda device, _: run_baseline(opened.cfg, secrets_, device, _fresh(o)),
                             owned=False)

    def open_protected(art: Opened, o: DeviceOptions) -> TeeSession:
        mode = o.mode("process", name)
        secrets_ = BaselineSecrets.from_sealed(art.tensors, art.meta)
        return start_session(name, art.cfg, o, mode, art.device_weights, secrets_,
                             lambda device, _: run_baseline(art.cfg, secrets_, device, _fresh(o)),
                             owned=True)

    rows = [Placement("embedding, norms, activations, residual adds, LM head", "enclave", "—",
                      "—"),
            Placement("q/k/v, o, gate/up, down", "device + enclave", linear_receives, holds, leaks,
                      holds=("layers.*.weight",), receives=("linear:*",))]
    if attention_on_device:
        rows.append(Placement("attention", "device", "Q, K, V under head/feature permutations",
                              "the KV cache, permuted",
                              "permutations only: undone by matching against the public prior "
                              "(MSP); the conversation: each head's sorted values identify every "
                              "token (veil/attacks/kv_inversion.py: 100% of 50 held-out windows on the default "
                              "model, also with the public prior standing in for a fine-tune)",
                              holds=("kv_cache.*",), receives=("attention:*",)))
    else:
        rows.append(Placement("attention (and the KV cache)", "enclave", "—", "—"))
    support = {**TorchOps.support, "attention": frozenset({"softmax"})} if attention_on_device \
        else {**TorchOps.support}
    return Scheme(
        name=name, system=system, protects="model weights", trusted="the TEE", sees=sees,
        kind="tee",
        status="**implemented** (baseline)", options=options, artifact_options=run_options,
        support={**support, "generation": frozenset({"standard"})},
        tolerance=Tolerance(tiny=1e-4, default=1e-3), placement=tuple(rows),
        open=open_, protect=protect, open_protected=open_protected)


BASELINES = (
    _schemes("tlg", "TransLinkGuard (MM'24)", TlgOptions,
             "permuted weights, permuted inputs; Q/K/V and the KV cache under permutations",
             "x with features permuted",
             "W[π_out][:, π_in]", "weights up to permutations: undone by MSP (veil/attacks/"
             "steal.py: 100% of rows and columns on every matrix of a fine-tuned default model; "
             "the whole fine-tune's top-1 gain with no queries — benchmarks/results/stealing.md)",
             True,
             TlgRunOptions),
    _schemes("soter", "SOTER (ATC'22)", SoterOptions,
             "scaled weights (one scalar per matrix); inputs in the clear",
             "x in the clear (a share of layers stays in the enclave)", "μ·W",
             "inputs in the clear; weights up to one scalar per matrix (MSP's least-squares "
             "rescale, the prior for the enclave's share: the whole fine-tune's top-1 gain with "
             "no queries — benchmarks/results/stealing.md)", False),
    _schemes("nnsplitter", "NNSplitter (ICML'23)", NNSplitterOptions,
             "weights with 1% of them noised; inputs in the clear", "x in the clear",
             "W + Δ (Δ on the 1% largest weights)",
             "inputs in the clear; 99% of the weights exactly (MSP resets the noised outliers "
             "to the prior: the whole fine-tune's top-1 gain with no queries — "
             "benchmarks/results/stealing.md)", False),
    _schemes("shadownet", "ShadowNet (S&P'23)", BaselineOptions,
             "scaled and permuted weights, permuted inputs", "x with features permuted",
             "diag(s)·W[π_out][:, π_in]",
             "weights up to scale and permutation: undone by MSP + rescaling (veil/attacks/"
             "steal.py: 100% of rows and columns; the whole fine-tune's top-1 gain with no "
             "queries — benchmarks/results/stealing.md)", False),
)
