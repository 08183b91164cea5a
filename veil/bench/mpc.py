"""`veil bench mpc`: MERGE's Table 1 / Fig. 4 on GPT-2-base shapes, parties as TCP processes.

Contenders: vanilla private generation, only-ER, only-MM and MERGE, at max sequence lengths
64/128/256/512 (prefix 4, greedy, batch 1, SEMI2K FM64/18), random weights (timing only).

Method (a full sweep — 508 vanilla decode steps at MSL 512 — does not fit this machine's time):
each configuration starts two party processes linked over TCP on loopback; they share the weights,
run the prompt step and `decode_steps` decode steps with every Ops call as its own SPU program
(veil/mpc/eager.py: per-category wall time, send bytes, send actions), and, for embedding
resending, the LM head over all MSL − 4 kept states. Every decode step at one MSL costs the same
(attention spans the fixed-capacity cache under a public mask) — except that the first also opens
the masks of weight slices the prompt's shapes did not use (the Beaver cache, docs/mpc.md) — so the
generation's total is composed: prompt step + first decode step + (MSL − 4 − 2) × median of the
later decode steps (+ head). The table reports the measured steps next to the composed totals.
Without the Beaver cache (`--no-weight-cache`, the previous baseline) every step re-opens every
weight's mask; results go to mpc_nocache.*.

`--fused` (suite `mpc-fused`) times the programs generation really runs — one SPU program per step
(veil/mpc/fused_timing.py) — instead of one per Ops call: totals a user waits for, without the split
by category; the head's 64-row program runs twice (the first run opens the table's mask for the
head's shape) and the head over n rows is composed as first + (n / 64 − 1) × second. Results go to
mpc_fused.*.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from veil.errors import ConfigError
from veil.model.config import ModelConfig

VARIANTS = ("vanilla", "only-er", "only-mm", "merge")
# "+logits": the same contender with MpcConfig(reveal="logits") — the client receives the logits
# and takes the argmax itself (MERGE's own ending; for vanilla, the client inputs its pick)
FUSED_CONTENDERS = ("vanilla", "only-er", "only-mm", "merge", "vanilla+logits", "merge+logits")
MSLS = (64, 128, 256, 512)
PREFIX = 4


def split_contender(name: str) -> tuple[str, str]:
    """"merge+logits" → ("merge", "logits"); "merge" → ("merge", "tokens")."""
    variant, _, reveal = name.partition("+")
    if variant not in VARIANTS or reveal not in ("", "logits"):
        raise ConfigError(f"unknown contender {name!r} (known: {', '.join(VARIANTS)}, each "
                          "optionally with +logits)")
    return variant, reveal or "tokens"


GPT2_BASE = ModelConfig(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                        n_kv_heads=12, d_ff=3072, max_seq_len=1024, norm="layer", norm_eps=1e-5,
                        activation="gelu_tanh", mlp="plain", position="learned", qkv_bias=True,
                        o_bias=True, mlp_bias=True, tie_embeddings=True, bos_token_id=50256,
                        eos_token_ids=(50256,), name="gpt2-base-shapes")


def model_for(variant: str, msl: int, base_name: str = "gpt2-base", seed: int = 0):
    """(config, owner's MPC params) of a contender: random weights, converted like a student.
    `base_name`: gpt2-base (the benchmark's shapes) or a tiny preset (the suite's test)."""
    from veil.model import zoo
    from veil.mpc.program import params_of
    from veil.variants.merge import merge, student_weights, variant_config

    if variant not in VARIANTS:
        raise ConfigError(f"unknown contender {variant!r} (known: {', '.join(VARIANTS)})")
    base = GPT2_BASE if base_name == "gpt2-base" else zoo.preset(base_name)
    cfg = base.with_(max_seq_len=msl)
    w = zoo.random_weights(cfg, seed)          # its own generator: a public seed, test weights
    if variant != "vanilla":
        scfg = variant_config(cfg, variant, msl)
        w = student_weights(cfg, w, scfg)
        cfg = scfg
        if cfg.attention == "constant" and cfg.norm == "affine":
            cfg, w = merge(cfg, w)
    return cfg, params_of(cfg, w)


def _party_main(argv: list[str]) -> None:
    """`python -m veil.bench.mpc party RANK VARIANT MSL PORT0 PORT1 DECODE_STEPS OUT LOG BASE
    WEIGHT_CACHE(0|1) MODE(eager|fused)`"""
    import numpy as np
    import spu.libspu as libspu

    from veil.mpc.cluster import Cluster
    from veil.mpc.eager import measure_party
    from veil.mpc.fused_timing import measure_fused_party
    from veil.mpc.spu_runtime import MpcConfig, scratch_dir

    rank, variant, msl, p0, p1, steps = (int(argv[0]), argv[1], int(argv[2]), int(argv[3]),
                                         int(argv[4]), int(argv[5]))
    out, log = Path(argv[6]), Path(argv[7])
    lo = libspu.logging.LogOptions()
    lo.enable_console_logger = False
    lo.system_log_path = str(log)
    libspu.logging.setup_logging(lo)
    variant, reveal = split_contender(variant)
    mc = MpcConfig(profile=True, weight_cache=argv[9] == "1", reveal=reveal)
    t0 = time.perf_counter()
    cfg, params = model_for(variant, msl, argv[8])
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    if rank != 0:
        params = None
    build_s = time.perf_counter() - t0
    cluster = Cluster.from_dict({"protocol": "semi2k", "timeout_s": 600,
                                 "parties": [f"127.0.0.1:{p0}", f"127.0.0.1:{p1}"]})
    lctx = libspu.link.create_brpc(cluster.link_desc(), rank)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, cfg.vocab_size, PREFIX)]
    how = measure_fused_party if argv[10] == "fused" else measure_party
    with scratch_dir():
        res = how(rank, lctx, cfg, mc, shapes, params, prompt if rank == 1 else None, PREFIX, msl,
                  steps, log)
    res["build_s"] = build_s
    # let the link deliver this party's last messages before the process goes: exiting at once
    # can drop an async send the peer's final step still waits for
    lctx.stop_link()
    out.write_text(json.dumps(res))
    os._exit(0)           # SPU's link threads must not keep the process alive


def measure(variant: str, msl: int, decode_steps: int = 3, timeout_s: float = 3000.0,
            base: str = "gpt2-base", weight_cache: bool = True,
            fused: bool = False) -> list[dict[str, Any]]:
    """Both parties' results for one contender (two processes over TCP on loopback): per-Ops
    programs and costs by category, or with `fused` the step programs generation runs."""
    from veil.mpc.cluster import free_ports

    if split_contender(variant)[1] != "tokens" and not fused:
        raise ConfigError("bench mpc: '+logits' contenders are timed with the fused programs only")
    ports = free_ports(2)
    with tempfile.TemporaryDirectory(prefix="veil-bench-mpc-") as tmp:
        procs, outs = [], []
        for rank in (0, 1):
            out, log = Path(tmp) / f"r{rank}.json", Path(tmp) / f"r{rank}.log"
            outs.append(out)
            cmd = [sys.executable, "-m", "veil.bench.mpc", "party", str(rank), variant, str(msl),
                   str(ports[0]), str(ports[1]), str(decode_steps), str(out), str(log), base,
                   str(int(weight_cache)), "fused" if fused else "eager"]
            # the parties' scratch (SPU's Beaver cache) lands in `tmp`, removed with it
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                          stderr=open(Path(tmp) / f"r{rank}.err", "w"),
                                          env=dict(os.environ, TMPDIR=tmp)))
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise ConfigError(f"bench mpc: {variant} at MSL {msl} did not finish in "
                                  f"{timeout_s:.0f} s") from None
        if any(p.returncode != 0 or not o.is_file() for p, o in zip(procs, outs)):
            errs = [(Path(tmp) / f"r{r}.err").read_text().strip().splitlines()[-1:] for r in (0, 1)]
            raise ConfigError(f"bench mpc: {variant} at MSL {msl} failed: {errs}")
        return [json.loads(o.read_text()) for o in outs]


def cfg_vocab(base: str) -> int:
    from veil.model import zoo

    return GPT2_BASE.vocab_size if base == "gpt2-base" else zoo.preset(base).vocab_size


def compose(parties: list[dict[str, Any]], msl: int) -> dict[str, Any]:
    """Per-category totals of a whole generation (see the module docstring). Time is the client's
    clock; bytes are both parties' sends; rounds are the larger send-action count."""
    n_gen = msl - PREFIX
    cats = parties[0]["phases"]["prompt"]["categories"].keys()
    out: dict[str, Any] = {"categories": {}, "measured": {}}

    def phase_total(p: dict, phase: str, key: str, cat: str) -> float:
        return p["phases"][phase]["categories"][cat][key]

    decodes = [k for k in parties[0]["phases"] if k.startswith("decode")]
    # the first decode step also opens the masks of weight slices the prompt step's shapes did
    # not use (the Beaver cache is per slice): counted once, the later steps' median n − 2 times
    first, later = (decodes[0], decodes[1:]) if len(decodes) > 1 else (None, decodes)
    for cat in cats:
        row = {}
        for key in ("seconds", "send_bytes", "send_actions"):
            per_party = []
            for p in parties:
                prompt = phase_total(p, "prompt", key, cat)
                step = statistics.median(phase_total(p, d, key, cat) for d in later)
                once = phase_total(p, first, key, cat) - step if first else 0.0
                head = phase_total(p, "head", key, cat) if "head" in p["phases"] else 0.0
                per_party.append(prompt + once + (n_gen - 1) * step + head)
            row[key] = (per_party[1] if key == "seconds" else
                        sum(per_party) if key == "send_bytes" else max(per_party))
        out["categories"][cat] = row
    client = parties[1]["phases"]
    out["measured"] = {
        "prompt_step_s": client["prompt"]["wall_s"],
        "decode_step_s": statistics.median(client[d]["wall_s"] for d in later),
        "first_decode_step_s": client[first]["wall_s"] if first else None,
        "head_s": client["head"]["wall_s"] if "head" in client else 0.0,
        "decode_step_bytes": statistics.median(
            sum(sum(c["send_bytes"] for c in p["phases"][d]["categories"].values())
                for p in parties) for d in later),
        "share_weights_s": parties[1]["share_weights_s"]}
    out["total_s"] = sum(r["seconds"] for r in out["categories"].values())
    out["total_bytes"] = sum(r["send_bytes"] for r in out["categories"].values())
    out["total_rounds"] = sum(r["send_actions"] for r in out["categories"].values())
    return out


def _logits_to_client(r: dict[str, Any]) -> list[dict[str, Any]]:
    """For resending contenders, the paper's ending: the client receives the secret-shared
    logits of all positions and takes the argmax itself (it then learns the logits, not just the
    tokens) — the head's argmax under MPC is dropped, the logits' opening added."""
    if r["contender"] not in ("only-er", "merge"):
        return []
    n, V = r["msl"] - PREFIX, r.get("vocab", 50257)
    cats = {k: dict(v) for k, v in r["categories"].items()}
    drop = cats["sampling"]
    opened = n * V * 8                             # FM64: the owner sends its share of the logits
    total_s = r["total_s"] - drop["seconds"]
    return [{**r, "contender": f"{r['contender']} (logits to client)",
             "categories": {**cats, "sampling": {"seconds": 0.0, "send_bytes": opened,
                                                 "send_actions": 1}},
             "total_s": total_s, "total_bytes": r["total_bytes"] - drop["send_bytes"] + opened,
             "total_rounds": r["total_rounds"] - drop["send_actions"] + 1}]


def compose_fused(parties: list[dict[str, Any]], msl: int) -> dict[str, Any]:
    """A whole generation from the fused programs' phases: prompt step + first decode step +
    (MSL − 6) × median later decode step (+ the head over MSL − 4 rows, composed from its two
    runs on `head_rows` rows). Time is the client's clock; bytes both parties' sends; rounds the
    larger send-action count."""
    n_gen = msl - PREFIX
    decodes = [k for k in parties[0]["phases"] if k.startswith("decode")]
    first, later = (decodes[0], decodes[1:]) if len(decodes) > 1 else (decodes[0], decodes)

    def total(p: dict, key: str) -> float:
        ph = p["phases"]
        steps = (ph["prompt"][key] + ph[first][key]
                 + (n_gen - 2) * statistics.median(ph[d][key] for d in later))
        if "head_first" in ph:
            steps += ph["head_first"][key] + (n_gen / p["head_rows"] - 1) * ph["head_again"][key]
        return steps

    client = parties[1]["phases"]
    head_s = (client["head_first"]["wall_s"]
              + (n_gen / parties[1]["head_rows"] - 1) * client["head_again"]["wall_s"]
              if "head_first" in client else 0.0)
    return {"total_s": total(parties[1], "wall_s"),
            "total_bytes": sum(total(p, "send_bytes") for p in parties),
            "total_rounds": max(total(p, "send_actions") for p in parties),
            "measured": {"prompt_step_s": client["prompt"]["wall_s"],
                         "first_decode_step_s": client[first]["wall_s"],
                         "decode_step_s": statistics.median(client[d]["wall_s"] for d in later),
                         "head_s": head_s, "compile_s": parties[1]["compile_s"],
                         "share_weights_s": parties[1]["share_weights_s"]}}


def markdown_fused(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    cache = ("weights' masks opened once (Beaver cache)" if meta.get("weight_cache")
             else "every product re-opens its weight's mask (no Beaver cache)")
    lines = [f"# MPC, fused step programs: vanilla vs MERGE on {meta['base']} ({meta['when']}, "
             f"{meta['machine']}, SEMI2K FM64/18, 2 parties as processes over TCP loopback; "
             f"{cache})", "",
             "The programs `veil generate --scheme mpc|merge` runs (one SPU program per step). "
             "Composed per generation (prefix 4, greedy, batch 1): prompt step + first decode step "
             "+ (MSL − 6) × median later decode step (+ MERGE's LM head over MSL − 4 rows: its "
             "64-row program's first run + (rows / 64 − 1) × its second). Seconds are the client's "
             "clock; GB are both parties' sends; rounds = send actions of the busier party.", "",
             "Contenders with `+logits` reveal the logits to the client, who takes the argmax "
             "itself (`reveal=\"logits\"`): MERGE's own ending (the authors' code returns the "
             "head's logits); for vanilla the client then inputs its pick as a fresh secret "
             "one-hot. The client learns the logit vectors at its positions, not only the tokens. "
             "Speed-up and communication are against `vanilla` (tokens only, argmax under MPC "
             "every step: the paper's baseline); the last column against `vanilla+logits`, "
             "where measured.", "",
             "| MSL | contender | prompt step s | first decode step s | later decode step s | "
             "head s | total s | speed-up | GB | % of vanilla comm | rounds | "
             "vs vanilla+logits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["msl"]: r for r in rows if r["contender"] == "vanilla"}
    base_l = {r["msl"]: r for r in rows if r["contender"] == "vanilla+logits"}
    for r in rows:
        m, v, vl = r["measured"], base.get(r["msl"]), base_l.get(r["msl"])
        speed = v["total_s"] / r["total_s"] if v else float("nan")
        comm = 100 * r["total_bytes"] / v["total_bytes"] if v else float("nan")
        vs_l = f"{vl['total_s'] / r['total_s']:.2f}×" if vl else "–"
        lines.append(f"| {r['msl']} | {r['contender']} | {m['prompt_step_s']:.2f} | "
                     f"{m['first_decode_step_s']:.2f} | {m['decode_step_s']:.2f} | "
                     f"{m['head_s']:.1f} | {r['total_s']:.1f} | {speed:.2f}× | "
                     f"{r['total_bytes'] / 1e9:.2f} | {comm:.1f}% | {int(r['total_rounds'])} | "
                     f"{vs_l} |")
    dates = sorted({r["when"] for r in rows if "when" in r})
    if len(dates) > 1:
        which = {d: sorted(f"{r['contender']} @ {r['msl']}" for r in rows if r.get("when") == d)
                 for d in dates}
        lines += ["", "Rows measured on: " + "; ".join(f"{d}: {', '.join(w)}"
                                                      for d, w in which.items()) + "."]
    lines += ["", "Goals (MERGE's paper, CrypTen on V100s): ≥ 26.5× at MSL 512, ≥ 7.75× at 128, "
              "communication ≤ 20% of vanilla at 512. Per-category costs: mpc.md (eager).", ""]
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    cache = ("weights' masks opened once (Beaver cache)" if meta.get("weight_cache")
             else "every product re-opens its weight's mask (no Beaver cache)")
    steps = ("first decode step + (MSL − 6) × median later decode step"
             if rows and rows[0]["measured"].get("first_decode_step_s") is not None
             else "(MSL − 5) × median measured decode step")
    lines = [f"# MPC: vanilla vs MERGE on {meta['base']} ({meta['when']}, {meta['machine']}, "
             f"SEMI2K FM64/18, 2 parties as processes over TCP loopback; {cache})", "",
             f"Composed per generation (prefix 4, greedy, batch 1): prompt step + {steps} "
             "(+ MERGE's LM head once). Seconds are the client's clock; GB are both parties' "
             "sends; rounds = send actions of the busier party.", "",
             "| MSL | contender | embedding s | linear s | attention s | norm s | activation s | "
             "sampling s | total s | speed-up | GB | % of vanilla comm | rounds | "
             "measured decode step s | measured prompt step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["msl"]: r for r in rows if r["contender"] == "vanilla"}
    rows = [x for r in rows for x in (r, *_logits_to_client(r))]
    for r in rows:
        c = r["categories"]
        v = base.get(r["msl"])
        speed = v["total_s"] / r["total_s"] if v else float("nan")
        comm = 100 * r["total_bytes"] / v["total_bytes"] if v else float("nan")
        lines.append(
            f"| {r['msl']} | {r['contender']} | " + " | ".join(
                f"{c[k]['seconds']:.1f}" for k in ("embedding", "linear", "attention", "norm",
                                                   "activation", "sampling"))
            + f" | {r['total_s']:.1f} | {speed:.2f}× | {r['total_bytes'] / 1e9:.2f} | "
              f"{comm:.1f}% | {int(r['total_rounds'])} | {r['measured']['decode_step_s']:.2f} | "
              f"{r['measured']['prompt_step_s']:.2f} |")
    lines += ["", "Goals (MERGE's paper, CrypTen on V100s): ≥ 26.5× at MSL 512, ≥ 7.75× at 128, "
              "communication ≤ 20% of vanilla at 512.", ""]
    return "\n".join(lines)


def run(msls: tuple[int, ...] = MSLS, variants: tuple[str, ...] | None = None,
        decode_steps: int = 3, out_dir: str | Path = "benchmarks/results",
        base: str = "gpt2-base", weight_cache: bool = True, fused: bool = False,
        update: bool = False) -> list[Path]:
    """Writes mpc.json / mpc.md (mpc_fused.* with `fused`; a `_nocache` suffix without the
    Beaver weight cache). With `update`, rows already in the JSON for other (MSL, contender)
    pairs are kept (each row carries the date it was measured), and the measured ones replace
    theirs."""
    variants = variants or (FUSED_CONTENDERS if fused else VARIANTS)
    import platform

    meta = {"when": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU", "base": base,
            "protocol": "semi2k", "field": "fm64", "fxp_bits": 18, "prefix": PREFIX,
            "decode_steps_measured": decode_steps, "weight_cache": weight_cache,
            "programs": "fused" if fused else "eager"}
    stem = "mpc" + ("_fused" if fused else "") + ("" if weight_cache else "_nocache")
    render = markdown_fused if fused else markdown
    rows: list[dict[str, Any]] = []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if update and (out / f"{stem}.json").is_file():
        old = json.loads((out / f"{stem}.json").read_text())
        rows = [{"when": old["meta"]["when"], **r} for r in old["rows"]]
    order = {c: i for i, c in enumerate(FUSED_CONTENDERS)}
    for msl in msls:
        for variant in variants:
            parties = measure(variant, msl, decode_steps, base=base, weight_cache=weight_cache,
                              fused=fused)
            rows = [r for r in rows if (r["msl"], r["contender"]) != (msl, variant)]
            rows.append({"msl": msl, "contender": variant, "vocab": cfg_vocab(base),
                         "when": meta["when"],
                         **(compose_fused if fused else compose)(parties, msl), "raw": parties})
            rows.sort(key=lambda r: (r["msl"], order.get(r["contender"], 99)))
            # written after every contender: a long sweep keeps what it measured
            (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            (out / f"{stem}.md").write_text(render(rows, meta))
    return [out / f"{stem}.json", out / f"{stem}.md"]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "party":
        _party_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "table":       # re-render mpc.md from mpc.json
        data = json.loads(Path(sys.argv[2]).read_text())
        render = markdown_fused if data["meta"].get("programs") == "fused" else markdown
        Path(sys.argv[2]).with_suffix(".md").write_text(render(data["rows"], data["meta"]))
    else:
        flags = ("--no-weight-cache", "--fused", "--update")
        args = [a for a in sys.argv[1:] if a not in flags]
        msls = tuple(int(x) for x in args[0].split(",")) if args else MSLS
        variants = tuple(args[1].split(",")) if len(args) > 1 else None
        for p in run(msls, variants, weight_cache="--no-weight-cache" not in sys.argv,
                     fused="--fused" in sys.argv, update="--update" in sys.argv):
            print(f"wrote {p}")
