"""`mpc`: two-party (or ABY3 three-party) private generation on SPU; `merge`: the same runtime on
a MERGE model (veil/variants/merge.py, trained by `veil train merge`).

    veil.load(model, scheme="mpc", protocol="semi2k", parties="sim" | "local", …)
    veil.load(merged_folder, scheme="merge", …)

The model's config decides the program: vanilla (one-hot embedding, real softmax/activation/norm,
LM head and argmax every step) or MERGE (constant attention, quad activation, resent states, the
LM head once at the end). `merge` only adds the check that the model is a MERGE variant, so a
user cannot believe they run MERGE on a vanilla model.

parties="sim" runs every party in this process over SPU's in-memory link (tests, quick checks);
"local" starts one OS process per party on loopback (veil/mpc/cluster.py) — the same party code
that `veil mpc party` runs on separate hosts. Generation is greedy (the argmax runs inside MPC)
and always the requested number of tokens: stopping at EOS early would tell the owner how long
the answer is, so the client cuts at EOS / stop strings itself afterwards (a
`FixedLengthSession`: the one loop's finish rules do the cutting). Several prompts run one after
another, each its own protocol run.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, fields
from typing import Literal

from veil.errors import ConfigError, UnsupportedError
from veil.model.config import ModelConfig
from veil.model.generate import GenerationTrace, SamplingConfig
from veil.model.opening import OpenedModel
from veil.model.weights import Weights
from veil.mpc.calibration import resolve
from veil.mpc.config import SUPPORT, MpcConfig
from veil.schemes.base import FixedLengthSession, Placement, Scheme, SchemeOptions, Tolerance


@dataclass(frozen=True)
class MpcOptions(MpcConfig, SchemeOptions):
    """The protocol's settings (MpcConfig) plus where the parties run."""

    parties: Literal["sim", "local"] = "sim"
    timeout_s: float = 60.0     # a peer silent this long is gone (ProtocolAbort)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.timeout_s <= 0:
            raise ConfigError(f"option 'timeout_s' must be positive, got {self.timeout_s}")

    def protocol_config(self) -> MpcConfig:
        """The settings every party must share (without the launcher's own)."""
        return MpcConfig(**{f.name: getattr(self, f.name) for f in fields(MpcConfig)})


class MpcSession(FixedLengthSession):
    """One prompt's generation is one protocol run (see the module docstring)."""

    def __init__(self, scheme: str, cfg: ModelConfig, weights: Weights, source: str,
                 options: MpcOptions) -> None:
        super().__init__(scheme, cfg)
        self.weights, self.source, self.options = weights, source, options
        # the launcher holds the weights: it settles norm_range="auto" before any party starts
        self.mc = resolve(options.protocol_config(), cfg, weights)
        self.last_compile_s = 0.0

    def run_fixed(self, prompt: list[int], s: SamplingConfig) -> tuple[list[int], GenerationTrace]:
        if not s.greedy:
            raise UnsupportedError(f"{self.scheme} generates greedily (the argmax runs inside "
                                   "MPC); sampling under MPC is not offered")
        # the run's length is fixed up front, within the context (the finish rules then mark a
        # row cut short by it, as the step loop does)
        n = min(s.max_new_tokens, self.cfg.max_seq_len - len(prompt))
        t0 = time.perf_counter()
        # jax and SPU load only when a protocol runs: `import veil` stays light
        if self.options.parties == "sim":
            from veil.mpc.program import params_of
            from veil.mpc.spu_runtime import simulate

            r = simulate(self.cfg, params_of(self.cfg, self.weights), prompt, n, self.mc)
            tokens, step_s, self.last_compile_s = r.tokens, r.step_s, r.compile_s
        else:
            from veil.mpc.cluster import generate_local

            tokens, step_s = generate_local(self.source, prompt, n, self.mc,
                                            timeout_s=self.options.timeout_s)
        total = time.perf_counter() - t0
        # prefill = everything up to the first token (linking, sharing the weights, compiling
        # and the prompt's step); decode = the remaining steps as the client timed them
        decode = sum(step_s[1:])
        return tokens, GenerationTrace(prefill_s=total - decode, decode_s=decode,
                                       prompt_tokens=len(prompt), decode_steps=len(step_s) - 1)


def _opener(name: str):
    def open_(opened: OpenedModel, options: MpcOptions) -> MpcSession:
        if options.protocol == "semi2k":
            warnings.warn(f"{name}: SPU's semi2k makes rank 0 (the model owner) its trusted "
                          "dealer, so it is not private against the owner; use "
                          "protocol='cheetah' or 'aby3' for that (docs/mpc.md)", stacklevel=3)
        # local party processes open the model by the same name
        return MpcSession(name, opened.cfg, opened.weights, opened.source, options)
    return open_


def _check_merge_model(cfg: ModelConfig) -> None:
    if cfg.attention != "constant" and cfg.generation == "standard":
        raise UnsupportedError("scheme 'merge' needs a MERGE model (constant attention and/or "
                               "embedding resending); make one with `veil train merge`, or use "
                               "scheme 'mpc' for vanilla private generation")


_DEALER = ("semi2k: rank 0 (the owner) is SPU's trusted dealer and could unmask everything — "
           "use cheetah or aby3 against a distrusting owner")
_LENGTHS = Placement("shape of the run", "public", "prompt length, number of new tokens", "—",
                     "the lengths (the output length is fixed by the client's request)")
# SEMI2K, FM64, 18 fractional bits: fixed-point rounding plus SPU's exp / rsqrt / reciprocal
# approximations — ≤ 2.5e-3 on the tiny presets, 0.05–0.11 on the default model (docs/mpc.md)
_FXP = Tolerance(tiny=1e-2, default=0.15)

MPC = Scheme(
    name="mpc", system="2PC (PUMA-style) on SPU", protects="weights and input",
    trusted="nobody: 2 non-colluding parties", sees="secret shares", kind="mpc",
    status="**implemented**: private generation (simulator and party processes) matches "
           "plaintext; each weight's Beaver mask opened once per session (vanilla decode step "
           "33 → 15 s on GPT-2-base shapes); `semi2k` trusts rank 0 as dealer — see "
           "[docs/mpc.md](docs/mpc.md)",
    options=MpcOptions, support=SUPPORT, tolerance=_FXP, open=_opener("mpc"),
    placement=(
        Placement("embedding (one-hot × table), forward, LM head, argmax", "all parties (shares)",
                  "shares of the weights / the prompt; masked values opened by the protocol",
                  "its shares of the weights and of the KV cache", _DEALER),
        _LENGTHS,
        Placement("generated token ids (reveal='logits': each step's logits; the client "
                  "takes the argmax and inputs its pick as a fresh secret)", "client",
                  "the other parties' shares of each token id (or logit vector)", "—"),
    ))

MERGE = Scheme(
    name="merge", system="MERGE (AAAI'24) on SPU", protects="weights and input",
    trusted="nobody: 2 non-colluding parties", sees="secret shares", kind="mpc",
    status="**implemented**: MERGE variants, `veil train merge`, per-category costs, `veil "
           "bench mpc` / `mpc-fused`; at MSL 128 with the paper's ending (logits to the "
           "client) 3.9× faster than vanilla on loopback and 8.6× (9.4× against the paper's "
           "vanilla) over a 100 Mbps / 20 ms WAN (vanilla projected from measured rounds and "
           "bytes, the projection within 5% of measured LAN/WAN runs); 2.85× / 7.2× with tokens "
           "only; the paper's 26.5× at 512 is not reached: 3.24× with tokens only, measured "
           "side by side (see [docs/merge.md](docs/merge.md))",
    options=MpcOptions, support=SUPPORT, tolerance=_FXP, open=_opener("merge"),
    check_model=_check_merge_model,
    placement=(
        Placement("attention table softmax (constant attention)", "owner, in plaintext",
                  "—", "—", ""),
        Placement("prompt embedding (one-hot × table), layers (V·table mixing, linears, quad, "
                  "norm), resent states", "all parties (shares)",
                  "shares of the weights, the softmaxed tables and the prompt; masked values "
                  "opened by the protocol",
                  "its shares of the weights, of each layer's value cache and of the kept states",
                  _DEALER),
        Placement("LM head + argmax, once after the loop", "all parties (shares)",
                  "masked values opened by the protocol", "—", ""),
        _LENGTHS,
        Placement("generated token ids (reveal='logits', MERGE's own ending: the head's "
                  "logits, which the client decodes)", "client",
                  "the other parties' shares of the token ids (or logits), all at the end", "—"),
    ))
