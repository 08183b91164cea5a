"""`scheme="mpc"`: two-party (or ABY3 three-party) private generation on SPU; `scheme="merge"`:
the same runtime on a MERGE model (variants/merge.py, trained by `veil train merge`).

    veil.load(model, scheme="mpc", protocol="semi2k", parties="sim" | "local", …)
    veil.load(merged_folder, scheme="merge", …)

The model's config decides the program: vanilla (one-hot embedding, real softmax/activation/norm,
LM head and argmax every step) or MERGE (constant attention, quad activation, resent states, the
LM head once at the end). `merge` only adds the check that the model is a MERGE variant, so a
user cannot believe they run MERGE on a vanilla model.

parties="sim" runs every party in this process over SPU's in-memory link (tests, quick checks);
"local" starts one OS process per party on loopback (veil/mpc/cluster.py) — the same party code
that `veil mpc party` runs on separate hosts. Generation is greedy (the argmax runs inside MPC),
one prompt at a time, and always the requested number of tokens: stopping at EOS early would tell
the owner how long the answer is, so the client cuts at EOS / stop strings itself afterwards.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Sequence

from veil.errors import ConfigError, UnsupportedError
from veil.model.config import ModelConfig
from veil.model.generate import GenerationTrace, RowResult, SamplingConfig, check_prompts
from veil.model.weights import Weights
from veil.mpc.jax_ops import JaxOps
from veil.mpc.spu_runtime import MPC_KEYS, MpcConfig


class MpcOps:
    """Not an executor the generic loop drives: the whole generation is one protocol run
    (`private_generate`), which `Model.generate` calls instead of the step loop."""

    name = "mpc"
    support = JaxOps.support

    def __init__(self, cfg: ModelConfig, weights: Weights, options: dict[str, Any],
                 name: str = "mpc") -> None:
        self.name = name
        self.cfg, self.weights = cfg, weights
        self.source = options.pop("model", None)
        self.parties = options.pop("parties", "sim")
        if self.parties not in ("sim", "local"):
            raise ConfigError(f"mpc: parties must be 'sim' or 'local', got {self.parties!r}")
        if self.parties == "local" and self.source is None:
            raise ConfigError("mpc: parties='local' needs the model's name (veil.load passes it)")
        try:
            self.timeout_s = float(options.pop("timeout_s", 60.0))
        except (TypeError, ValueError):
            raise ConfigError("mpc: timeout_s must be a number of seconds") from None
        if self.timeout_s <= 0:
            raise ConfigError("mpc: timeout_s must be positive")
        try:
            self.mc = MpcConfig(**{k: options.pop(k) for k in MPC_KEYS if k in options})
        except TypeError as exc:
            raise ConfigError(f"mpc: {exc}") from None
        if options:
            raise ConfigError(f"{name}: unknown options {sorted(options)}")
        if self.name == "merge" and cfg.attention != "constant" and cfg.generation == "standard":
            raise ConfigError("scheme 'merge' needs a MERGE model (constant attention and/or "
                              "embedding resending); make one with `veil train merge`, or use "
                              "scheme 'mpc' for vanilla private generation")
        if self.mc.protocol == "semi2k":
            warnings.warn("mpc: SPU's semi2k makes rank 0 (the model owner) its trusted dealer, "
                          "so it is not private against the owner; use protocol='cheetah' or "
                          "'aby3' for that (docs/mpc.md)", stacklevel=3)
        self.last_compile_s = 0.0

    def new_cache(self, batch: int, capacity: int) -> Any:
        raise UnsupportedError("mpc runs whole generations (Model.generate); per-call logits "
                               "are not offered under MPC")

    def private_generate(self, prompts: Sequence[Sequence[int]], s: SamplingConfig,
                         stop_check: Callable[[int, list[int]], bool] | None = None,
                         on_token: Callable[[int, int], None] | None = None
                         ) -> tuple[list[RowResult], GenerationTrace]:
        if len(prompts) != 1:
            raise UnsupportedError("mpc generates for one prompt at a time")
        if not s.greedy:
            raise UnsupportedError("mpc generates greedily (the argmax runs inside MPC); "
                                   "sampling under MPC is not offered")
        check_prompts(self.cfg, prompts)
        prompt = [int(t) for t in prompts[0]]
        if len(prompt) + s.max_new_tokens > self.cfg.max_seq_len:
            raise UnsupportedError(f"mpc: {len(prompt)} + {s.max_new_tokens} tokens exceed the "
                                   f"model's {self.cfg.max_seq_len}")
        t0 = time.perf_counter()
        if self.parties == "sim":
            from veil.mpc.program import params_of
            from veil.mpc.spu_runtime import simulate

            r = simulate(self.cfg, params_of(self.cfg, self.weights), prompt, s.max_new_tokens, self.mc)
            tokens, step_s, self.last_compile_s = r.tokens, r.step_s, r.compile_s
        else:
            from veil.mpc.cluster import generate_local

            tokens, step_s = generate_local(self.source, prompt, s.max_new_tokens, self.mc,
                                            timeout_s=self.timeout_s)
        total = time.perf_counter() - t0
        row = RowResult()
        for tok in tokens:
            row.token_ids.append(tok)
            if on_token is not None:
                on_token(0, tok)
            if s.stop_on_eos and tok in self.cfg.eos_token_ids:
                row.finish_reason = "eos"
                break
            if stop_check is not None and stop_check(0, row.token_ids):
                row.finish_reason = "stop"
                break
        # prefill = everything up to the first token (linking, sharing the weights, compiling
        # and the prompt's step); decode = the remaining steps as the client timed them
        decode = sum(step_s[1:])
        trace = GenerationTrace(prefill_s=total - decode, decode_s=decode, prompt_tokens=len(prompt),
                                decode_steps=len(step_s) - 1)
        return [row], trace
