"""Time, bytes and rounds of the fused programs: what `veil generate --scheme mpc|merge` runs.

`eager.py` splits a step's cost by op category by running every Ops call as its own SPU program.
That costs a dispatch and a link synchronisation per call (hundreds per step) and keeps SPU from
batching work across calls, so its totals overstate what a user waits for. This module measures
the programs generation actually runs (spu_runtime.StepProgram, HeadProgram): the prompt step,
`decode_steps` decode steps and, with embedding resending, the LM head — whole, with no split by
category. The bench composes a generation's total from them the same way as from the eager steps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from veil.errors import ConfigError
from veil.model.config import ModelConfig
from veil.mpc.config import CLIENT
from veil.mpc.eager import HEAD_ARGMAX_ROWS, ProfileTail
from veil.mpc.spu_runtime import Binder, PartySteps


def measure_fused_party(rank: int, lctx: Any, cfg: ModelConfig, mc: Any,
                        param_shapes: dict[str, tuple[int, ...]], params: dict[str, Any] | None,
                        prompt: list[int] | None, n_prompt: int, capacity: int,
                        decode_steps: int, log_path: Path | None) -> dict[str, Any]:
    """One party: bind the inputs, run the prompt step and `decode_steps` decode steps of a
    generation that fills `capacity` (spu_runtime.PartySteps: the steps generation runs, with
    what each reveals) and, with embedding resending, the head over
    min(capacity − n_prompt, HEAD_ARGMAX_ROWS) kept states twice — the first run also opens the
    table's Beaver mask for the head's shape, the second is what every further block of rows
    costs. Each phase: this party's wall time, and its send bytes and send actions from SPU's
    profile (when `log_path` is the party's SPU log) plus the shares it sent outside the
    programs."""
    if decode_steps < 1 or n_prompt + decode_steps + 1 > capacity:
        raise ConfigError(f"{decode_steps} decode steps after a {n_prompt}-token prompt do not "
                          f"fit a capacity of {capacity}")
    bind = Binder.open(rank, lctx, mc, profile=log_path is not None)
    rows = min(capacity - n_prompt, HEAD_ARGMAX_ROWS)
    steps = PartySteps(bind, cfg, mc, param_shapes, n_prompt, capacity - n_prompt, capacity,
                       head_rows=rows)
    share_s = steps.share_inputs(params, prompt)

    profile = ProfileTail(log_path) if log_path is not None else None
    phases: dict[str, dict[str, float]] = {}

    def timed(label: str, work: Callable[[], None]) -> None:
        if profile is not None:
            profile.take()                        # drop whatever preceded this phase
        t = time.perf_counter()
        before = (bind.sent_bytes, bind.sends)
        work()
        wall = time.perf_counter() - t
        sent, actions = profile.take() if profile is not None else (0, 0)
        # plus the shares sent outside the programs (what is opened to the client, its input)
        sent += bind.sent_bytes - before[0]
        actions += bind.sends - before[1]
        phases[label] = {"wall_s": wall, "send_bytes": sent, "send_actions": actions}

    for i in range(decode_steps + 1):
        timed("prompt" if i == 0 else f"decode{i - 1}", lambda i=i: steps.step(i))
    if steps.head is not None:
        # the loop kept h0..h{decode_steps}; the head reads `rows` states — the values do not
        # change its cost, so the client shares stand-ins for the rest
        stand_in = np.random.default_rng(0).standard_normal((1, 1, cfg.d_model), dtype=np.float32)
        for j in range(decode_steps + 1, rows):
            bind.secret(f"h{j}", 0.1 * stand_in if rank == CLIENT else None, CLIENT)
        timed("head_first", steps.run_head)
        timed("head_again", steps.run_head)
    return {"rank": rank, "share_weights_s": share_s, "compile_s": steps.compile_s,
            "head_rows": rows if steps.head is not None else 0, "phases": phases}
