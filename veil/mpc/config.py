"""The MPC runtime's settings: protocol, fixed-point encoding, what the client learns. Light (no
jax or SPU import), so a scheme's options can be checked before any engine is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from veil.backends.plain import TorchOps
from veil.errors import ConfigError
from veil.model.config import ModelConfig

# The variants the jax program (mpc/jax_ops.py) runs: plain's, less Power-Softmax's polynomial
# norm, activation and attention (written for the HE backend; the program has no code for them).
SUPPORT = {**TorchOps.support, "norm": TorchOps.support["norm"] - {"poly"},
           "activation": TorchOps.support["activation"] - {"poly"},
           "attention": TorchOps.support["attention"] - {"power"}}

PROTOCOLS = {"semi2k": ("SEMI2K", 2), "cheetah": ("CHEETAH", 2), "aby3": ("ABY3", 3)}
FIELDS = {"fm64": "FM64", "fm128": "FM128"}
OWNER, CLIENT = 0, 1
# the MpcConfig fields a user sets
MPC_KEYS = ("protocol", "field", "fxp_bits", "exp_iters", "weight_cache", "reveal", "norm_range",
            "norm_shift", "head_softmax", "trunc_msb")
NORM_RANGES = ("auto", "plain", "reduced")


@dataclass(frozen=True)
class MpcConfig:
    """Protocol and fixed-point settings (SPU's RuntimeConfig, named as users know them)."""

    protocol: str = "semi2k"
    field: str = "fm64"
    fxp_bits: int = 18
    # exp(x) ≈ (1 + x/2ⁿ)^(2ⁿ): SPU's default n = 8 is 5% off at x = −5 and 16% at −10, which
    # distorts a peaked softmax; n = 12 (four more squarings) is within 1% down to −10
    exp_iters: int = 12
    # SEMI2K opens a Beaver-masked copy of every secret operand at every product — for a weight
    # that is the whole matrix, every step (~1.2 GB per GPT-2-base decode step). With the cache
    # each weight's mask is opened once per session and its triples reuse that mask with fresh
    # masks on the activations (weight-stationary triples, SPU's Beaver cache): same values,
    # same security (W − B is opened once instead of W − B_i many times), a fraction of the traffic.
    # Other protocols do not open weights this way; there it changes nothing.
    weight_cache: bool = True
    # What the client learns. "tokens": only the generated token ids — the argmax runs under MPC
    # (vanilla: every step, its one-hot the next step's secret input; MERGE: once, in the head).
    # "logits": the client receives each position's logits and takes the argmax itself — MERGE's
    # own protocol (the authors' code returns the head's logits), and for vanilla the client
    # then inputs the next token's one-hot as a fresh secret. The client learns the logit
    # vectors (the model's output distribution at its own positions), not just the tokens.
    reveal: str = "tokens"
    # How norms take 1/rms under MPC. "reduced": SpuOps' four-regime range reduction, for models
    # with massive activations (SmolLM2: residual entries ~22 000; one rsqrt there wraps the ring
    # or keeps ~3 significant bits) — three extra squares, four rsqrts and the selects, measured
    # 386 ms vs 105 ms for one 768-wide row in the simulator. "plain": one mean square and one
    # rsqrt, for models whose norm inputs stay in its range. "auto": chosen per model from a
    # public calibration of its norm inputs (veil/mpc/calibration.py) by whoever holds the
    # weights before the parties start; a party that receives "auto" unresolved takes
    # "reduced", which is correct for every model.
    norm_range: str = "auto"
    # with norm_range "plain": x is scaled by 2^norm_shift (public, from the calibration) before
    # its mean square, so the rsqrt's input sits where fixed point keeps its precision (a norm is
    # scale-invariant; eps is scaled alike) — one multiply by a public power of two
    norm_shift: int = 0
    # The MERGE paper's vanilla baseline: softmax over the whole vocabulary under MPC before the
    # argmax, every step (the argmax of the softmax is the argmax of the logits: same tokens,
    # more work). Off: the argmax of the logits.
    head_softmax: bool = False
    # SPU's trunc_allow_msb_error: fixed-point truncation done locally, as CrypTen does, accepting
    # a rare large error (when a value's share wraps) for fewer rounds; off by default
    trunc_msb: bool = False
    profile: bool = False       # SPU's per-op time and traffic (rank 0's log)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"option 'protocol' must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        if self.field not in FIELDS:
            raise ConfigError(f"option 'field' must be one of {sorted(FIELDS)}, got {self.field!r}")
        limit = 62 if self.field == "fm128" else 30
        if not 8 <= self.fxp_bits <= limit:
            raise ConfigError(f"option 'fxp_bits' must be in [8, {limit}] for {self.field}, got {self.fxp_bits}")
        if not isinstance(self.exp_iters, int) or not 1 <= self.exp_iters <= 24:
            raise ConfigError(f"option 'exp_iters' must be an integer in [1, 24], got {self.exp_iters!r}")
        if not isinstance(self.weight_cache, bool):
            raise ConfigError(f"option 'weight_cache' must be true or false, got {self.weight_cache!r}")
        if self.reveal not in ("tokens", "logits"):
            raise ConfigError(f"option 'reveal' must be 'tokens' or 'logits', got {self.reveal!r}")
        if self.norm_range not in NORM_RANGES:
            raise ConfigError(f"option 'norm_range' must be one of {list(NORM_RANGES)}, got "
                              f"{self.norm_range!r}")
        if not isinstance(self.norm_shift, int) or not -12 <= self.norm_shift <= 12:
            raise ConfigError(f"option 'norm_shift' must be an integer in [-12, 12], got "
                              f"{self.norm_shift!r}")
        for name in ("head_softmax", "trunc_msb"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"option {name!r} must be true or false, got "
                                  f"{getattr(self, name)!r}")
        if self.head_softmax and self.reveal != "tokens":
            raise ConfigError("option 'head_softmax' is the softmax before the argmax under MPC; "
                              "with reveal='logits' there is no argmax under MPC")

    @property
    def norm_form(self) -> str:
        """The norm form the programs compile: "plain" or "reduced" ("auto" unresolved takes
        the form that is correct for every model)."""
        return "plain" if self.norm_range == "plain" else "reduced"

    def agreement(self, cfg: ModelConfig) -> bytes:
        """What every party must agree on for the protocol to line up (settings that change
        which messages flow, and the model's public shape), as a digest the parties compare
        before anything secret moves — a mismatch would otherwise desynchronise the protocol
        into garbage or a stall."""
        import hashlib
        import json
        from dataclasses import asdict

        fields = {k: v for k, v in asdict(self).items() if k != "profile"}
        shape = {k: v for k, v in asdict(cfg).items() if k != "name"}
        blob = json.dumps([fields, shape], sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).digest()

    @property
    def world(self) -> int:
        return PROTOCOLS[self.protocol][1]

    def runtime_config(self):
        import spu.libspu as libspu

        rc = libspu.RuntimeConfig(protocol=getattr(libspu.ProtocolKind, PROTOCOLS[self.protocol][0]),
                                  field=getattr(libspu.FieldType, FIELDS[self.field]),
                                  fxp_fraction_bits=self.fxp_bits)
        if self.exp_iters:
            rc.fxp_exp_iters = self.exp_iters
        rc.enable_pphlo_profile = rc.enable_hal_profile = self.profile
        rc.trunc_allow_msb_error = self.trunc_msb
        return rc
