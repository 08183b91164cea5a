"""The `tee` benchmark suite: every TEE scheme against `plain`, measured here and projected.

`python -m veil.bench.tee SPEC` (a `WorkerSpec` as JSON; run by the harness in a fresh process)
prints one JSON object. Placement on this machine: the enclave (this process) on one core with
one torch thread, each scheme's device in its own process on another core with one thread;
`plain` and `shielded` run on the enclave's core alone. All schemes are loaded at once and their
repeats alternated, so the machine's drift hits every contender alike.

Per scheme: decode tokens/s (median of repeats), the error vs plain, and — from one prefill of
LONG_PROMPT tokens and one decode step after it — the counts: device/enclave FLOPs, bytes and
round trips, pad material, resident secrets. The counts are projected onto a hardware profile
(veil/tee/latency.py) for the comparison this CPU cannot make: a slow TEE beside a fast GPU.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Any

import torch

import veil
from veil.bench.spec import WorkerSpec
from veil.cost import SplitCost
from veil.schemes import SCHEMES, of_kind
from veil.schemes.base import EnclaveHolding
from veil.schemes.tee import DeviceOptions
from veil.tee.latency import SplitCounts, counts_row, load_hardware, project

LONG_PROMPT = 256
# Tuned rows beside the registry's defaults: (label, scheme, options). "loro-paper": the public
# code's settings (one pad per layer, reused; attention under permutations only) — weaker, kept
# to show what veil's hardening costs. "kvshield-paper": KV-Shield as published (a permutation
# folded into the device's W_q/W_k/W_v; veil's default pads and rotates in the enclave instead).
# "loro-f64": pad products in float64 (half the error, twice the pad bytes); "loro-block": both
# sides block on every read instead of spinning first (what the wait policy buys).
EXTRA_ROWS = (("loro-paper", "loro", {"pads": "fixed", "attention_mixing": "permute"}),
              ("loro-f64", "loro", {"pad_products": "float64"}),
              ("loro-block", "loro", {"wait": "block"}),
              ("kvshield-paper", "kvshield", {"mixing": "permute", "fold": True}))
# The user's path, nothing tuned: `veil.load(model)` and `veil.load(model, scheme="loro")` with the
# device mode, threads, cores and waits veil picks (veil/tee/placement.py), alternated; then, alone,
# a thread device (the mode veil picks for small models, or with device="thread").
DEFAULT_ROWS = (("plain", "plain", {}), ("loro", "loro", {}))
THREAD_ROW = ("loro · device thread", "loro", {"device": "thread"})


def contenders() -> list[tuple[str, str, dict[str, Any]]]:
    """Every host and TEE scheme of the registry with its defaults, then the tuned rows (after
    the scheme they tune)."""
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for s in of_kind("host") + of_kind("tee"):
        rows.append((s.name, s.name, {}))
        rows += [r for r in EXTRA_ROWS if r[1] == s.name]
    return rows


def _pin() -> tuple[int | None, bool]:
    """This process on the first core it may use; the device gets the second (None: one core)."""
    cpus = sorted(os.sched_getaffinity(0))
    torch.set_num_threads(1)
    if len(cpus) < 2:
        return None, False
    os.sched_setaffinity(0, {cpus[0]})
    return cpus[1], True


def _counts(model: Any, ids: list[int], weight_bytes: float) -> dict[str, Any]:
    """SplitCounts of a prefill of `ids` and of the decode step after it (difference of a 2-token
    and a 1-token generation), as dicts, plus pad/offline figures per token."""
    one = model.generate(ids, max_new_tokens=1, ignore_eos=True).cost
    two = model.generate(ids, max_new_tokens=2, ignore_eos=True).cost

    def make(flops: float, s: SplitCost | None) -> SplitCounts:
        if model.scheme == "plain":
            return SplitCounts.accelerator_only(flops, weight_bytes)
        if s is None:   # shielded: everything in the enclave
            return SplitCounts(flops, weight_bytes, 0, 0, 0, 0, 0, 0)
        return SplitCounts(flops, weight_bytes, s.device_flops, s.device_weight_bytes,
                           s.enclave_overlap_flops, s.enclave_flops - s.enclave_overlap_flops,
                           s.moved_bytes,   # sealed pad products included
                           s.round_trips, s.enclave_crypto_bytes, s.enclave_overlap_crypto_bytes)

    step = two.split.since(one.split) if two.split is not None and one.split is not None else None
    out = {"prefill": counts_row(make(one.flops, one.split)),
           "decode": counts_row(make(two.flops - one.flops, step))}
    if two.split is not None and two.split.offline_flops:
        rows = len(ids) + 2      # the pool is filled for the whole context before prefill
        out["offline_flops_per_token"] = two.split.offline_flops / rows
        out["offline_s_per_token"] = two.split.offline_s / rows
        out["pad_bytes_per_token"] = step.pad_bytes_used if step is not None else 0
    return out


def worker(model_name: str, repeats: int, n: int, prompt: str) -> dict[str, Any]:
    device_cpu, separate = _pin()
    split_opts = {"device": "process", "device_threads": 1}
    if device_cpu is not None:
        split_opts["device_cpus"] = [device_cpu]

    def options(scheme: str, opts: dict[str, Any]) -> dict[str, Any]:
        takes_device = issubclass(SCHEMES[scheme].options, DeviceOptions)
        return {**opts, **split_opts} if takes_device else opts

    models = {label: veil.load(model_name, scheme=s, **options(s, opts))
              for label, s, opts in contenders()}
    plain = models["plain"]
    ids = plain.encode(prompt) if plain.tokenizer is not None else [1, 2, 3, 4, 5, 6]
    weight_bytes = float(sum(t.nbytes for t in plain.ops.w.values()))
    ref_logits = plain.logits([ids])
    ref_tokens = plain.generate(ids, max_new_tokens=n, ignore_eos=True).token_ids
    gen = torch.Generator().manual_seed(0)
    long_ids = torch.randint(0, plain.cfg.vocab_size, (min(LONG_PROMPT, plain.cfg.max_seq_len - 4),),
                             generator=gen).tolist()
    out: dict[str, Any] = {"separate_cores": separate, "prompt_tokens": len(ids), "new_tokens": n,
                           "weight_bytes": weight_bytes, "long_prompt": len(long_ids), "schemes": {}}
    for s, m in models.items():
        m.generate(ids, max_new_tokens=4, ignore_eos=True)   # warm-up
        r = m.generate(ids, max_new_tokens=n, ignore_eos=True)
        out["schemes"][s] = {
            "max_abs_logit_err_vs_plain": float((m.logits([ids]) - ref_logits).abs().max()),
            "same_tokens_as_plain": r.token_ids == ref_tokens,
            "resident_secret_bytes": (m.session.resident_secret_bytes()
                                      if isinstance(m.session, EnclaveHolding) else 0),
            "decode_tokens_per_s": [], "prefill_s": [], "device_busy_frac": [],
            "enclave_wait_frac": [], **_counts(m, long_ids, weight_bytes)}
    for _ in range(repeats):
        for s, m in models.items():
            c = m.generate(ids, max_new_tokens=n, ignore_eos=True).cost
            row = out["schemes"][s]
            row["decode_tokens_per_s"].append(c.decode_tokens_per_s)
            row["prefill_s"].append(c.prefill_s)
            wall = c.prefill_s + c.decode_s
            split = c.split if c.split is not None else SplitCost()
            row["device_busy_frac"].append(split.device_busy_s / wall)
            row["enclave_wait_frac"].append(split.enclave_wait_s / wall)
            row["last_cost"] = c.row()        # the record the CLI prints, field for field
    for m in models.values():
        m.close()
    # resident secrets without factor multiplexing (no timing needed)
    with veil.load(model_name, scheme="loro", bank=0) as m:
        out["schemes"]["loro"]["resident_secret_bytes_no_multiplexing"] = \
            m.ops.resident_secret_bytes()
    return out


def rows_and_table(w: dict[str, Any], model: str, hardware_path: str,
                   defaults: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Harness rows (one per scheme, then one per default-settings row) and the markdown for the
    suite's results file."""
    hw = load_hardware(hardware_path)
    base_tps = statistics.median(w["schemes"]["plain"]["decode_tokens_per_s"])
    proj_ref = {ph: project(SplitCounts(**w["schemes"]["plain"][ph]), hw)["total_s"]
                for ph in ("prefill", "decode")}
    rows = []
    for s, r in w["schemes"].items():
        tps = r["decode_tokens_per_s"]
        dec = SplitCounts(**r["decode"])
        pre = SplitCounts(**r["prefill"])
        pd, pp = project(dec, hw), project(pre, hw)
        rows.append({
            "suite": "tee", "scheme": s, "model": model, "prompt_tokens": w["prompt_tokens"],
            "new_tokens": w["new_tokens"], "repeats": len(tps), "median": statistics.median(tps),
            "min": min(tps), "max": max(tps), "unit": "decode tokens/s",
            "latency_vs_plain": base_tps / statistics.median(tps),
            "prefill_s": statistics.median(r["prefill_s"]),
            "device_busy_frac": statistics.median(r["device_busy_frac"]),
            "enclave_wait_frac": statistics.median(r["enclave_wait_frac"]),
            "max_abs_logit_err_vs_plain": r["max_abs_logit_err_vs_plain"],
            "same_tokens_as_plain": r["same_tokens_as_plain"],
            "bytes_per_decode_token": dec.transfer_bytes, "round_trips_per_decode_token": dec.round_trips,
            "enclave_flop_share": dec.enclave_share,
            "resident_secret_mib": r["resident_secret_bytes"] / 2**20,
            "resident_secret_frac": r["resident_secret_bytes"] / w["weight_bytes"],
            "resident_secret_mib_no_multiplexing": r.get("resident_secret_bytes_no_multiplexing", 0) / 2**20,
            "offline_pad_mflop_per_token": r.get("offline_flops_per_token", 0) / 1e6,
            "offline_pad_ms_per_token": r.get("offline_s_per_token", 0) * 1e3,
            "pad_kib_per_token": r.get("pad_bytes_per_token", 0) / 1024,
            "projected_decode_ms": pd["total_s"] * 1e3, "projected_prefill_ms": pp["total_s"] * 1e3,
            "projected_decode_vs_accel": pd["total_s"] / proj_ref["decode"],
            "projected_prefill_vs_accel": pp["total_s"] / proj_ref["prefill"],
            "projection": {"decode": pd, "prefill": pp}, "counts": {"decode": r["decode"], "prefill": r["prefill"]},
            "last_cost": r["last_cost"],
        })
    default_rows = _default_rows(defaults, model) if defaults is not None else []
    return rows + default_rows, _markdown(rows, w, hw, default_rows, defaults)


def _default_rows(d: dict[str, Any], model: str) -> list[dict[str, Any]]:
    base = statistics.median(d["schemes"]["plain"]["decode_tokens_per_s"])
    rows = []
    for label, r in d["schemes"].items():
        tps = r["decode_tokens_per_s"]
        rows.append({"suite": "tee-defaults", "scheme": label, "model": model,
                     "repeats": len(tps), "median": statistics.median(tps), "min": min(tps),
                     "max": max(tps), "unit": "decode tokens/s",
                     "latency_vs_plain": base / statistics.median(tps),
                     "prefill_s": statistics.median(r["prefill_s"]),
                     "same_tokens_as_plain": r["same_tokens_as_plain"], "placement": r["placement"],
                     "device": r.get("device") or "—",
                     "beside_thread_device": r.get("beside_thread_device")})
    return rows


def _markdown(rows: list[dict[str, Any]], w: dict[str, Any], hw: Any,
              default_rows: list[dict[str, Any]] | None = None,
              defaults: dict[str, Any] | None = None) -> str:
    cores = ("enclave and device each pinned to its own core, one torch thread each; plain and "
             "shielded on the enclave's core" if w["separate_cores"] else
             "ONE core only: enclave and device shared it")
    r0 = rows[0]
    out = ["# tee", "",
           f"{r0['model']} · prompt {r0['prompt_tokens']} tokens, {r0['new_tokens']} new, greedy, batch 1, "
           f"fp32 · median of {r0['repeats']} repeats, alternated in one process.", ""]
    if default_rows:
        assert defaults is not None
        out += ["## Default settings (what `veil.load` and `veil generate` give)", "",
                f"Nothing pinned or tuned by the benchmark: {defaults['cores']} cores, torch's "
                f"{defaults['threads']} threads for plain; `veil.load(model, scheme=\"loro\")` "
                "with the device mode and placement veil chose (veil/tee/placement.py); plain "
                "and loro alternated, then the thread device alone.", "",
                "| scheme | device | decode tok/s | min | max | latency vs plain | prefill s | "
                "same tokens | placement |", "|---|---|---|---|---|---|---|---|---|"]
        for r in default_rows:
            out.append(f"| {r['scheme']} | {r['device']} | {r['median']:.2f} | {r['min']:.2f} | "
                       f"{r['max']:.2f} | {r['latency_vs_plain']:.2f}× | {r['prefill_s']:.3f} | "
                       f"{r['same_tokens_as_plain']} | {r['placement'] or '—'} |")
        beside = next((r["beside_thread_device"] for r in default_rows if r["scheme"] == "plain"
                       and r.get("beside_thread_device")), None)
        if beside:
            out += ["", f"While a thread device lives in the same process, plain decodes at "
                        f"{statistics.median(beside):.2f} tok/s (it shares the interpreter and "
                        "torch's thread pool): one reason veil runs a large model's device as a "
                        "process."]
        out.append("")
    out += [f"## One core each ({cores})", "",
           "| scheme | decode tok/s | min | max | latency vs plain | prefill s | device busy | enclave waits "
           "| max abs logit err | same tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['scheme']} | {r['median']:.2f} | {r['min']:.2f} | {r['max']:.2f} | "
                   f"{r['latency_vs_plain']:.2f}× | {r['prefill_s']:.3f} | {r['device_busy_frac']:.0%} | "
                   f"{r['enclave_wait_frac']:.0%} | {r['max_abs_logit_err_vs_plain']:.1e} | "
                   f"{r['same_tokens_as_plain']} |")
    out += ["", f"## Counts per decode step (context {w['long_prompt']} tokens)", "",
            "| scheme | enclave share of FLOPs | channel KiB/token (pad products incl.) | round trips/token | "
            "resident secrets MiB | % of weights | without multiplexing MiB | offline pad MFLOP/token | "
            "offline pad ms/token |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nm = f"{r['resident_secret_mib_no_multiplexing']:.1f}" if r["resident_secret_mib_no_multiplexing"] else "—"
        pad = (f"{r['offline_pad_mflop_per_token']:.0f} | {r['offline_pad_ms_per_token']:.2f}"
               if r["offline_pad_mflop_per_token"] else "— | —")
        out.append(f"| {r['scheme']} | {r['enclave_flop_share']:.2%} | {r['bytes_per_decode_token'] / 1024:.0f} | "
                   f"{r['round_trips_per_decode_token']:.0f} | {r['resident_secret_mib']:.1f} | "
                   f"{r['resident_secret_frac']:.2%} | {nm} | {pad} |")
    out += ["", f"## Projected onto {hw.name}", "",
            "Counts above (and of a prefill of the same context) mapped by veil/tee/latency.py; "
            "parameters and their sources in veil/tee/hardware/. `plain` = the whole model on the "
            "accelerator, unprotected (LoRO's REE-only reference); `shielded` = the whole model in the TEE.", "",
            f"| scheme | prefill {w['long_prompt']} ms | vs accelerator-only | decode ms/token | vs accelerator-only |",
            "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['scheme']} | {r['projected_prefill_ms']:.1f} | {r['projected_prefill_vs_accel']:.2f}× | "
                   f"{r['projected_decode_ms']:.2f} | {r['projected_decode_vs_accel']:.2f}× |")
    return "\n".join(out) + "\n"


def _device_kind(m: Any) -> str:
    """'process' or 'thread' for a split scheme's device; '' for a scheme without one."""
    device = getattr(getattr(m.session, "ops", None), "device", None)
    if device is None:
        return ""
    return "process" if device.proc is not None else "thread"


def defaults_worker(model_name: str, repeats: int, n: int, prompt: str) -> dict[str, Any]:
    """DEFAULT_ROWS as a user gets them (no pinning, no thread settings; alternated repeats), then
    THREAD_ROW alone with plain beside it — a thread device slows a plain model in the same
    process, so it is measured after the others are closed."""
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "cores": len(os.sched_getaffinity(0)),
                           "schemes": {}}

    def measure(models: dict[str, Any], ids: list[int], ref: list[int] | None) -> list[int]:
        for label, m in models.items():
            m.generate(ids, max_new_tokens=4, ignore_eos=True)
            placement = getattr(m.session, "placement", None)
            tokens = m.generate(ids, max_new_tokens=n, ignore_eos=True).token_ids
            ref = ref if ref is not None else tokens
            out["schemes"].setdefault(label, {
                "same_tokens_as_plain": tokens == ref,
                "placement": placement.describe() if placement is not None else "",
                "device": _device_kind(m),
                "decode_tokens_per_s": [], "prefill_s": []})
        for _ in range(repeats):
            for label, m in models.items():
                c = m.generate(ids, max_new_tokens=n, ignore_eos=True).cost
                out["schemes"][label]["decode_tokens_per_s"].append(c.decode_tokens_per_s)
                out["schemes"][label]["prefill_s"].append(c.prefill_s)
        return ref

    models = {label: veil.load(model_name, scheme=s, **opts) for label, s, opts in DEFAULT_ROWS}
    # one prompt for every row: the thread row is measured alone, and its tokens are compared
    # with plain's on the same ids
    ids = (models["plain"].encode(prompt) if models["plain"].tokenizer is not None
           else [1, 2, 3, 4, 5, 6])
    ref = measure(models, ids, None)
    models["loro"].close()
    label, s, opts = THREAD_ROW
    thread = veil.load(model_name, scheme=s, **opts)
    out["schemes"]["plain"]["beside_thread_device"] = []
    measure({label: thread}, ids, ref)
    for _ in range(repeats):
        out["schemes"]["plain"]["beside_thread_device"].append(
            models["plain"].generate(ids, max_new_tokens=n, ignore_eos=True).cost.decode_tokens_per_s)
    thread.close()
    models["plain"].close()
    return out


def main() -> None:
    spec = WorkerSpec.from_argv(sys.argv[1:])
    run = defaults_worker if spec.mode == "tee-defaults" else worker
    print(json.dumps(run(spec.model, spec.repeats, spec.new_tokens, spec.prompt)))


if __name__ == "__main__":
    main()
