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
MPC_KEYS = ("protocol", "field", "fxp_bits", "exp_iters", "weight_cache", "reveal")


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
        return rc
