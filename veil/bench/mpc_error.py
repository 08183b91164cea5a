"""The error an SPU lever adds over whole generations: `trunc_msb` (SPU's trunc_allow_msb_error,
truncation done locally as CrypTen does, which may flip a share's top bit with a small
probability per truncation and then corrupts that value completely).

Each model generates greedily from a held-out prompt in SPU's simulator (SEMI2K FM64/18, both
parties as threads in this process) twice — without and with the lever — the client receiving
every step's logits, and once in plain torch with its LM head's outputs recorded. Reported per
model and run: whether the tokens are plain's, where they first differ, the largest logit error
against plain over the steps whose inputs are still plain's, and the largest difference the
lever makes against the same run without it. The speed side of the lever is in
benchmarks/results/mpc_fused.md (two parties as processes).

    python -m veil.bench.mpc_error [MODEL,MODEL…] [--new-tokens=N]
        → benchmarks/results/mpc_trunc_msb.{json,md,png}
"""

from __future__ import annotations

import datetime
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from veil.bench import split_argv

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
PROMPT_TOKENS = 8


def _prompt(m: Any, n: int) -> list[int]:
    if m.tokenizer is None:
        return [int(t) % m.cfg.vocab_size for t in (3, 17, 99, 5, 42, 7, 11, 2)][:n]
    from veil.train.merge_recipe import corpus_tokens
    ids = corpus_tokens(m.tokenizer, "shakespeare", "heldout", 4000)
    return [int(t) for t in ids[100:100 + n]]


def plain_steps(m: Any, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Plain greedy tokens and each step's logits (the LM head's last row, recorded as the
    model's own generation runs — resending states where the model resends)."""
    seen: list[np.ndarray] = []
    head = m.ops.lm_head

    def record(x):
        y = head(x)
        seen.append(y[..., -1, :].reshape(-1).float().numpy().copy())
        return y

    m.ops.lm_head = record
    try:
        tokens = m.generate(prompt, max_new_tokens=n, ignore_eos=True).token_ids
    finally:
        del m.ops.lm_head
    return tokens, seen[:n]


def _first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def measure(model: str, new_tokens: int, prompt_tokens: int = PROMPT_TOKENS) -> dict[str, Any]:
    import veil
    from veil.mpc.calibration import resolve
    from veil.mpc.config import MpcConfig
    from veil.mpc.program import params_of
    from veil.mpc.spu_runtime import simulate

    m = veil.load(model)
    prompt = _prompt(m, prompt_tokens)
    ref, ref_logits = plain_steps(m, prompt, new_tokens)
    params = params_of(m.cfg, m.ops.w)
    runs: dict[str, dict[str, Any]] = {}
    logits: dict[str, list[np.ndarray]] = {}
    base = resolve(MpcConfig(), m.cfg, m.ops.w)     # the norm calibration, once for both runs
    for key, trunc in (("off", False), ("on", True)):
        mc = replace(base, trunc_msb=trunc)
        t0 = time.perf_counter()
        r = simulate(m.cfg, params, prompt, new_tokens, mc, reveal_logits=True)
        logits[key] = [np.asarray(x, dtype=np.float64).reshape(-1) for x in r.logits]
        diff = _first_diff(r.tokens, ref)
        # a step's logits are comparable with plain's while its inputs are plain's: up to and
        # including the first step whose token differs
        upto = len(ref) if diff is None else diff + 1
        err = [float(np.abs(logits[key][i] - ref_logits[i]).max()) for i in range(upto)]
        runs[key] = {"same_tokens": r.tokens == ref, "first_diff": diff,
                     "max_abs_logit_err": max(err), "median_step_max_abs_logit_err":
                     float(np.median(err)), "per_step_max_abs_logit_err": err,
                     "norm_range": mc.norm_range, "simulator_s": time.perf_counter() - t0}
    both = min(len(ref) if runs[k]["first_diff"] is None else runs[k]["first_diff"] + 1
               for k in runs)
    lever = [float(np.abs(logits["on"][i] - logits["off"][i]).max()) for i in range(both)]
    m.close()
    return {"model": model, "name": m.cfg.name or m.cfg.family, "layers": m.cfg.n_layers,
            "generation": m.cfg.generation, "attention": m.cfg.attention,
            "prompt_tokens": len(prompt), "new_tokens": new_tokens,
            "logit_scale": float(np.median([np.abs(x).max() for x in ref_logits])),
            "runs": runs, "max_abs_on_vs_off": max(lever), "per_step_on_vs_off": lever}


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# SPU's trunc_msb over whole generations ({meta['when']}, {meta['machine']}, "
             "SEMI2K FM64/18, SPU simulator)", "",
             "Each model generates greedily from the same held-out prompt without and with "
             "`MpcConfig(trunc_msb=True)` (SPU's `trunc_allow_msb_error`), the client receiving "
             "every step's logits, and in plain torch (`veil/bench/mpc_error.py`). Logit errors "
             "are against plain's logits over the steps whose inputs are still plain's; *on vs "
             "off* is the largest difference the lever makes over the steps both runs share. "
             "Its speed: benchmarks/results/mpc_fused.md (levers).", "",
             "| model | layers | generation | prompt + new | norm | logit scale | tokens = plain (off / on) "
             "| first differing token (off / on) | max abs logit err off | on | on vs off |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        off, on = r["runs"]["off"], r["runs"]["on"]
        fd = lambda x: "—" if x is None else str(x)        # noqa: E731
        lines.append(f"| {r['name']} | {r['layers']} | {r['generation']} | "
                     f"{r['prompt_tokens']} + {r['new_tokens']} | {off['norm_range']} | "
                     f"{r['logit_scale']:.1f} | {off['same_tokens']} / {on['same_tokens']} | "
                     f"{fd(off['first_diff'])} / {fd(on['first_diff'])} | "
                     f"{off['max_abs_logit_err']:.2e} | {on['max_abs_logit_err']:.2e} | "
                     f"{r['max_abs_on_vs_off']:.2e} |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from veil.bench.results import save_figure

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for r in res["rows"]:
        for key, style in (("off", "-"), ("on", "--")):
            e = r["runs"][key]["per_step_max_abs_logit_err"]
            ax.plot(range(len(e)), e, style, label=f"{r['name']} · trunc_msb {key}")
    ax.set_yscale("log")
    ax.set_xlabel("generated token")
    ax.set_ylabel("max |logit − plain|")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def run(models: list[str], new_tokens: int, out_dir: Path = RESULTS) -> list[Path]:
    from veil.bench.results import write_results

    meta = {"when": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()} CPU", "protocol": "semi2k", "field": "fm64",
            "fxp_bits": 18, "command": "python -m veil.bench.mpc_error " + ",".join(models)
            + f" --new-tokens={new_tokens}"}
    rows = [measure(m, new_tokens) for m in models]
    res = {"meta": meta, "rows": rows}
    return write_results(out_dir, "mpc_trunc_msb", res, markdown(meta, rows), plot)


if __name__ == "__main__":
    args, opts = split_argv(sys.argv[1:])
    for p in run(args[0].split(",") if args else ["default"], int(opts.get("new-tokens", 24))):
        print(p)
