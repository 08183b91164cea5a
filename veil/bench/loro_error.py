"""LoRO's logit error against plain over many draws of the secrets — the figure the scheme's
stated tolerance rests on.

LoRO is exact in real arithmetic; its error is the device's float32 rounding of products whose
terms are ~42× larger than the true ones (docs/tee.md, "LoRO's numerics"), so it depends on the
draw of the masks and pads, and one draw says little about the tail. Each draw loads the model
anew (new masks, pads and head mixings from the OS CSPRNG) and runs fixed prompts teacher-forced;
per prompt and pad-product dtype it reports the max |Δlogit| over all positions and the whole
vocabulary (min, median, max over draws) and whether every position's argmax is plain's. The
dtypes alternate draw by draw.

    python -m veil.bench.loro_error [MODEL] [--draws=N]
        → benchmarks/results/loro_error.{json,md,png}
    python -m veil.bench.loro_error table    (re-render them against the stated tolerance)
"""

from __future__ import annotations

import datetime
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from veil.bench import split_argv

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
PROMPTS = ("The quick brown fox jumps over the lazy dog because",
           "Alice shared her medical history with the assistant:",
           "In 1905, Albert Einstein published four papers that")
DTYPES = ("float32", "float64")


def measure(model: str, draws: int) -> dict[str, Any]:
    import veil

    plain = veil.load(model)
    refs = []
    for p in PROMPTS:
        ids = plain.encode(p) if plain.tokenizer is not None else [
            (7 * i + len(p)) % plain.cfg.vocab_size for i in range(10)]
        refs.append((ids, plain.logits([ids])))
    plain.close()
    errs: dict[str, list[list[float]]] = {d: [] for d in DTYPES}
    argmax_same: dict[str, list[list[bool]]] = {d: [] for d in DTYPES}
    t0 = time.perf_counter()
    for i in range(draws):
        for d in DTYPES:
            with veil.load(model, scheme="loro", pad_products=d) as m:
                got = [m.logits([ids]) for ids, _ in refs]
            errs[d].append([float((g - r).abs().max()) for g, (_, r) in zip(got, refs)])
            argmax_same[d].append([bool((g.argmax(-1) == r.argmax(-1)).all())
                                   for g, (_, r) in zip(got, refs)])
            print(f"draw {i} {d}: " + " ".join(f"{e:.2e}" for e in errs[d][-1]), flush=True)
    return {"model": model, "draws": draws, "prompts": list(PROMPTS), "errors": errs,
            "argmax_same": argmax_same, "tolerance": stated_tolerance(model),
            "seconds": time.perf_counter() - t0}


def stated_tolerance(model: str) -> float:
    from veil.schemes import get

    tol = get("loro").tolerance
    return tol.default if model == "default" else tol.tiny


def summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for d in DTYPES:
        per = res["errors"][d]
        for j, p in enumerate(res["prompts"]):
            col = sorted(e[j] for e in per)
            rows.append({"dtype": d, "prompt": p, "min": col[0],
                         "median": statistics.median(col), "max": col[-1],
                         "over_tolerance": sum(e > res["tolerance"] for e in col),
                         "argmax_same": all(a[j] for a in res["argmax_same"][d])})
        flat = sorted(x for e in per for x in e)
        rows.append({"dtype": d, "prompt": "all", "min": flat[0],
                     "median": statistics.median(flat), "max": flat[-1],
                     "over_tolerance": sum(e > res["tolerance"] for e in flat),
                     "argmax_same": all(all(a) for a in res["argmax_same"][d])})
    return rows


def markdown(meta: dict[str, Any], res: dict[str, Any]) -> str:
    n = res["draws"]
    lines = [f"# LoRO's logit error over {n} draws of the secrets ({res['model']}, {meta['when']}, "
             f"{meta['machine']})", "",
             f"`{meta['command']}`. Each draw: `veil.load(model, scheme=\"loro\", "
             "pad_products=…)` (new masks, pads and head mixings), each prompt teacher-forced; "
             "max |Δlogit| against plain over every position and the whole vocabulary. The "
             f"scheme's stated tolerance: {res['tolerance']:g}.", "",
             "| pad products | prompt | min | median | max | draws over tolerance | every "
             "argmax plain's |", "|---|---|---|---|---|---|---|"]
    for r in summary(res):
        count = n * (len(res["prompts"]) if r["prompt"] == "all" else 1)
        lines.append(f"| {r['dtype']} | {r['prompt']} | {r['min']:.2e} | {r['median']:.2e} | "
                     f"{r['max']:.2e} | {r['over_tolerance']}/{count} | "
                     f"{'yes' if r['argmax_same'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from veil.bench.results import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for d in DTYPES:
        vals = sorted(x for e in res["errors"][d] for x in e)
        ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=f"{d} products")
    ax.axvline(res["tolerance"], color="k", ls="--", lw=0.8, label="stated tolerance")
    ax.set_xlabel("max |Δlogit| vs plain (one draw, one prompt)")
    ax.set_ylabel("fraction of draws ≤")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def run(model: str, draws: int, out_dir: Path = RESULTS) -> list[Path]:
    from veil.bench.results import write_results

    meta = {"when": datetime.date.today().isoformat(), "machine": f"{platform.machine()} CPU",
            "command": f"python -m veil.bench.loro_error {model} --draws={draws}"}
    res = measure(model, draws)
    return write_results(out_dir, "loro_error", {"meta": meta, **res}, markdown(meta, res), plot)


def rerender(out_dir: Path = RESULTS) -> list[Path]:
    import json

    from veil.bench.results import write_results

    res = json.loads((out_dir / "loro_error.json").read_text())
    res["tolerance"] = stated_tolerance(res["model"])
    return write_results(out_dir, "loro_error", res, markdown(res["meta"], res), plot)


if __name__ == "__main__":
    if sys.argv[1:] == ["table"]:
        print(*rerender(), sep="\n")
        sys.exit(0)
    args, opts = split_argv(sys.argv[1:])
    for p in run(args[0] if args else "default", int(opts.get("draws", 16))):
        print(p)
