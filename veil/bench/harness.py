"""Benchmark harness: suites run their contenders in fresh subprocesses (so peak memory is each
one's own), repeat, and write JSON rows, a markdown table and a plot.

Row fields: suite, scheme, model, prompt_tokens, new_tokens, repeats, median/min/max decode
tokens/s, prefill seconds, peak RSS (MiB), bytes on channels (0 for single-process schemes), and
the error vs plain (max |Δlogit| and whether the greedy tokens are identical).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from veil.bench import kv_inversion
from veil.bench import mpc as mpc_bench
from veil.bench import stealing
from veil.bench.spec import WorkerSpec
from veil.bench.tee import rows_and_table
from veil.tee.latency import DEFAULT_HARDWARE, load_hardware
from veil.errors import ConfigError

SUITES = ("plain-vs-hf", "tee", "mpc", "mpc-fused", "kv-inversion", "stealing")


def _worker(mode: str, model: str, repeats: int, new_tokens: int,
            module: str = "veil.bench.worker") -> dict[str, Any]:
    spec = WorkerSpec(mode, model, repeats, new_tokens)
    cmd = [sys.executable, "-m", module, json.dumps(asdict(spec))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise ConfigError(f"benchmark worker {mode!r} failed: "
                          f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(suite: str, scheme: str, model: str, w: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    tps = w["decode_tokens_per_s"]
    err = max(abs(a - b) for a, b in zip(w["first_logits"], ref["first_logits"]))
    return {"suite": suite, "scheme": scheme, "model": model,
            "prompt_tokens": w["prompt_tokens"], "new_tokens": w["new_tokens"],
            "repeats": len(tps), "median": statistics.median(tps), "min": min(tps), "max": max(tps),
            "unit": "decode tokens/s", "prefill_s": statistics.median(w["prefill_s"]),
            "peak_rss_mib": w["peak_rss_mib"], "bytes": 0, "rounds": 0,
            "max_abs_logit_err_vs_plain": err, "same_tokens_as_plain": w["tokens"] == ref["tokens"]}


def plain_vs_hf(model: str, repeats: int, new_tokens: int) -> list[dict[str, Any]]:
    """veil `plain` vs transformers' own `generate`: fp32, batch 1, same prompt, greedy.

    Speed: both in one process, repeats alternated. Memory: each alone in a fresh process.
    """
    timed = _worker("speed", model, repeats, new_tokens)
    for impl in ("veil", "hf"):
        timed[impl].update(_worker(f"memory-{impl}", model, 1, new_tokens))
    return [_row("plain-vs-hf", "plain", model, timed["veil"], timed["veil"]),
            _row("plain-vs-hf", "transformers", model, timed["hf"], timed["veil"])]


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    base = rows[0]
    lines = [f"# {base['suite']}", "",
             f"{meta['when']} · {meta['machine']} · torch threads {meta['threads']} · "
             f"prompt {base['prompt_tokens']} tokens, {base['new_tokens']} new tokens, "
             f"greedy, batch 1, fp32, median of {base['repeats']} alternated repeats in one process; "
             "peak RSS of each alone in a fresh process", "",
             "| scheme | model | decode tok/s (median) | min | max | ratio vs plain | prefill s | "
             "peak RSS MiB | RSS vs plain | max abs logit err vs plain | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['model']} | {r['median']:.2f} | {r['min']:.2f} | "
                     f"{r['max']:.2f} | {r['median'] / base['median']:.3f} | {r['prefill_s']:.3f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base['peak_rss_mib']:.3f} | "
                     f"{r['max_abs_logit_err_vs_plain']:.2e} | {r['same_tokens_as_plain']} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows)), 3.2))
    names = [r["scheme"] for r in rows]
    med = [r["median"] for r in rows]
    err = [[r["median"] - r["min"] for r in rows], [r["max"] - r["median"] for r in rows]]
    ax.bar(names, med, yerr=err, capsize=4, color="#4c72b0")
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{rows[0]['suite']} · {rows[0]['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_suite(suite: str, model: str = "default", repeats: int = 3, new_tokens: int = 64,
              out_dir: str | Path = "benchmarks/results", hardware: str | Path | None = None) -> list[Path]:
    """Run one suite; returns the files written (JSON, markdown, PNG). hardware: the profile the
    `tee` suite projects onto (default: veil/tee/hardware/jetson-orin-nx-optee.json)."""
    if suite not in SUITES:
        raise ConfigError(f"unknown benchmark suite {suite!r} (known: {', '.join(SUITES)})")
    if repeats < 1 or new_tokens < 2:
        raise ConfigError("repeats must be ≥ 1 and new_tokens ≥ 2")
    if suite == "kv-inversion":   # attacks' figures, not speed: bench/kv_inversion.py
        return kv_inversion.run(model, out_dir=out_dir)
    if suite == "stealing":       # attacks' figures: bench/stealing.py
        out = Path(out_dir)
        lora = stealing.run(model, 200, repeats, out / "stealing_lora.json", lora_rank=8)
        return stealing.write(stealing.run(model, 200, repeats, out / "stealing.json"), out, lora)
    if suite in ("mpc", "mpc-fused"):   # own sweeps (GPT-2-base shapes, MSL 64–512): bench/mpc.py
        return mpc_bench.run(out_dir=out_dir, fused=suite == "mpc-fused")
    meta = {"when": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU",
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}
    if suite == "tee":
        hw_path = Path(hardware) if hardware is not None else DEFAULT_HARDWARE
        load_hardware(hw_path)             # a bad profile fails before the long run
        measured = _worker("tee", model, repeats, new_tokens, module="veil.bench.tee")
        defaults = _worker("tee-defaults", model, repeats, new_tokens, module="veil.bench.tee")
        rows, markdown = rows_and_table(measured, model, str(hw_path), defaults)
        meta["hardware"] = str(hw_path.name)
        meta["threads"] = 1
    else:
        rows = plain_vs_hf(model, repeats, new_tokens)
        markdown = _markdown(rows, meta)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / suite
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    paths[0].write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    paths[1].write_text(markdown)
    _plot(rows, paths[2])
    return paths
