"""`veil bench he`: end-to-end encrypted inference of a Power-Softmax polynomial model under CKKS
(SEAL via TenSEAL, 128-bit parameters), beside the Power-Softmax paper's end-to-end figures
(Pythia-70M, 128 tokens, 93 s on an A100 with HEaaN bootstrapping; the predicted token unchanged
in 99% of cases).

Parts (each a section of benchmarks/results/he.{json,md,png}):
  forward      the small polynomial model (`veil train power --target small`) through
               `veil.load(folder, scheme="he")` — the defaults a user gets: server process, masked
               client-aided refresh, n16384 — one encrypted forward per prompt length, repeated:
               min/median/max seconds, the paper's categories, primitive counts, refreshes (which
               stand in for bootstrapping), bytes each way, key bytes; an unmasked row beside it
  generation   `generate()` on the same session: seconds per new token (each is a forward of the
               whole sequence: no KV cache under encryption)
  agreement    over ≥ 100 held-out prompts: the encrypted next token against plaintext's, and the
               same forward on clear slot vectors (veil/he/clear.py: the algorithm without CKKS
               noise) — which error is whose; resumable (a JSONL in the cache)
  layer        layer 0 of the converted default model (`veil train power`), one encrypted layer
               in-process: seconds by category and the hidden state's error against plaintext
  projection   the depth planner (veil/he/plan.py) × per-primitive timings of this machine:
               checked against the measured small-model forward, then Pythia-70M shapes at 128
               tokens — what this CPU would take, single-threaded, for the paper's end-to-end row
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import veil
from veil.bench.results import save_figure, write_results
from veil.errors import ConfigError
from veil.he import params as he_params
from veil.he.ckks import Engine
from veil.he.clear import ClearEngine, local_forward
from veil.he.executor import CATEGORIES, choose_layout, rotation_steps
from veil.he.plan import plan, primitive_costs, project
from veil.model import zoo
from veil.model.config import ModelConfig
from veil.model.forward import hidden_states
from veil.model.opening import open_model
from veil.model.ops import Step

RESULTS = Path("benchmarks/results")
PARAMS = "n16384"
# the paper's end-to-end row: Pythia-70M, 128 tokens, HElayers/HEaaN on one A100 (seconds, shares)
PAPER = {"total_s": 93.0, "tokens": 128, "agreement": 0.99,
         "shares": {"plain×cipher matmul": 0.30, "bootstrapping": 0.19, "cipher×cipher": 0.18,
                    "adds / rescales": 0.16, "softmax": 0.095, "GELU + inv-sqrt": 0.08}}
# Pythia-70M's shapes with the small model's polynomial variants (poly norm, degree-2 activation)
PYTHIA = dict(d_model=512, n_layers=6, n_heads=8, n_kv_heads=8, head_dim=64, d_ff=2048, vocab_size=50304,
              max_seq_len=2048, mlp="plain", name="pythia-70m-shapes")


def small_folder() -> Path:
    from veil.train.power_recipe import PowerRecipe, default_out

    return default_out(PowerRecipe(target="small")) / "model"


def default_folder() -> Path:
    from veil.train.power_recipe import PowerRecipe, default_out

    return default_out(PowerRecipe(target="default")) / "model"


def _need(folder: Path, target: str) -> Path:
    if not (folder / "veil_model.json").is_file():
        raise ConfigError(f"{folder}: no model; make it with `veil train power --target {target}`")
    return folder


def heldout_ids(model: veil.Model, n: int) -> list[int]:
    from veil.train.power_recipe import _tokens

    toks = _tokens(open_model(model.source), "shakespeare")["heldout"]
    if len(toks) < n:
        raise ConfigError(f"held-out text has {len(toks)} tokens, fewer than {n}")
    return [int(t) for t in toks[:n]]


def _final_normed(ops: Any, hs: np.ndarray) -> torch.Tensor:
    """What the client does with the last position of a decrypted hidden state: its final norm
    (1, 1, d)."""
    return ops.norm(torch.tensor(hs[-1:], dtype=torch.float32)[None], "final_norm")


def _stats(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "runs": len(xs)}


# ---- forward and generation ----------------------------------------------------------------

def bench_forward(folder: Path, lengths: tuple[int, ...], repeats: int, mask: bool,
                  plain: veil.Model, ids: list[int], params: str = PARAMS) -> dict[str, Any]:
    t0 = time.perf_counter()
    m = veil.load(str(folder), scheme="he", mask=mask, params=params)
    open_s = time.perf_counter() - t0
    rows = []
    try:
        s = m.session
        for n in lengths:
            prompt = ids[:n]
            ref = plain.logits([prompt])[0, -1]
            runs, costs, errs, agree = [], [], [], []
            for _ in range(repeats):
                before = s.client.ch.stats.snapshot()
                t0 = time.perf_counter()
                logits = s.logits_last(prompt)
                runs.append(time.perf_counter() - t0)
                after = s.client.ch.stats.snapshot()
                cost = s.last_cost
                cost["to_server"] = after["bytes_sent"] - before["bytes_sent"]
                cost["to_client"] = after["bytes_received"] - before["bytes_received"]
                costs.append(cost)
                errs.append(float((logits - ref).abs().max()))
                agree.append(int(logits.argmax()) == int(ref.argmax()))
            med = costs[int(np.argsort(runs)[len(runs) // 2])]
            rows.append({
                "tokens": n, "mask": mask, "seconds": _stats(runs),
                "server_s": _stats([c["total_s"] for c in costs]),
                "categories": {k: statistics.median(c["seconds"].get(k, 0.0) for c in costs)
                               for k in CATEGORIES},
                "primitives": med["primitives"], "refreshes": med["refreshes"],
                "refresh_ciphertexts": sum(r["ciphertexts"] for r in med["refresh_detail"]),
                "refresh_detail": med["refresh_detail"], "levels_used": med["levels_used"],
                "gs_iterations": med["gs_iterations"],
                "bytes_to_server": med["to_server"], "bytes_to_client": med["to_client"],
                "max_logit_error": max(errs), "argmax_equal": all(agree)})
        setup = {"open_s": open_s, "key_bytes": s.client.setup_bytes,
                 "T": s.client.lay.T, "C": s.client.lay.C,
                 "galois_steps": len(rotation_steps(m.cfg, s.client.lay))}
    finally:
        m.close()
    return {"setup": setup, "rows": rows}


def bench_generation(folder: Path, prompt: list[int], new_tokens: int, params: str = PARAMS
                     ) -> dict[str, Any]:
    with veil.load(str(folder), scheme="he", params=params) as m:
        t0 = time.perf_counter()
        out = m.generate(prompt, max_new_tokens=new_tokens)
        total = time.perf_counter() - t0
    with veil.load(str(folder)) as plain:
        ref = plain.generate(prompt, max_new_tokens=new_tokens).token_ids
    return {"prompt_tokens": len(prompt), "new_tokens": len(out.token_ids), "total_s": total,
            "s_per_token": total / max(1, len(out.token_ids)),
            "same_tokens_as_plain": list(out.token_ids) == list(ref)}


# ---- agreement ------------------------------------------------------------------------------

def _agreement_log(folder: Path, params: str, tokens: int) -> Path:
    """One log per model version (its folder, config and weights' size and time), set, length."""
    folder = Path(folder).resolve()
    stamp = [(folder / "veil_model.json").read_text()]
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        stamp.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:12]
    name = f"he_agreement-{folder.parent.name}-{folder.name}-{digest}-{params}-{tokens}.jsonl"
    return zoo.cache_dir() / "bench" / name


def bench_agreement(folder: Path, prompts: int, tokens: int, ids: list[int],
                    plain: veil.Model, progress: bool = True, params: str = PARAMS
                    ) -> dict[str, Any]:
    """Resumable: each prompt's outcome is appended to a JSONL in the cache."""
    log = _agreement_log(folder, params, tokens)
    log.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    windows = [ids[i * tokens:(i + 1) * tokens] for i in range(prompts)]
    if len(windows[-1]) < tokens:
        raise ConfigError(f"need {prompts}×{tokens} held-out tokens")
    opened = open_model(str(folder))
    cfg = opened.cfg
    layer_w = {k: v for k, v in opened.weights.items() if k.startswith("layers.")}
    p = he_params.get(params)
    if len(done) < prompts:
        with veil.load(str(folder), scheme="he", params=params) as m, log.open("a") as f:
            for i in range(len(done), prompts):
                w = windows[i]
                ref = plain.logits([w])[0, -1]
                t0 = time.perf_counter()
                enc = m.session.logits_last(w)
                dt = time.perf_counter() - t0
                emb = plain.session.ops.embed(torch.tensor([w]))[0]
                h, _ = local_forward(cfg, layer_w, ClearEngine(p),
                                     choose_layout(cfg, p.slots, m.session.client.lay.T), emb)
                clear = plain.session.ops.lm_head(_final_normed(plain.session.ops, h))[0, -1]
                rec = {"i": i, "plain": int(ref.argmax()), "enc": int(enc.argmax()),
                       "clear": int(clear.argmax()), "enc_err": float((enc - ref).abs().max()),
                       "clear_err": float((clear - ref).abs().max()), "s": dt}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                done.append(rec)
                if progress:
                    print(f"he agreement {i + 1}/{prompts}: {rec}", flush=True)
    done = done[:prompts]
    return {"prompts": len(done), "tokens": tokens, "params": params,
            "encrypted_vs_plain": sum(r["enc"] == r["plain"] for r in done) / len(done),
            "clear_vs_plain": sum(r["clear"] == r["plain"] for r in done) / len(done),
            "encrypted_vs_clear": sum(r["enc"] == r["clear"] for r in done) / len(done),
            "enc_err_median": statistics.median(r["enc_err"] for r in done),
            "enc_err_max": max(r["enc_err"] for r in done),
            "clear_err_median": statistics.median(r["clear_err"] for r in done),
            "clear_err_max": max(r["clear_err"] for r in done),
            "seconds_median": statistics.median(r["s"] for r in done)}


# ---- one layer of the converted default model -----------------------------------------------

def bench_layer(tokens: int, ids: list[int]) -> dict[str, Any]:
    opened = open_model(str(_need(default_folder(), "default")))
    cfg = opened.cfg.with_(n_layers=1)
    w = {k: v for k, v in opened.weights.items()
         if not k.startswith("layers.") or k.startswith("layers.0.")}
    p = he_params.get(PARAMS)
    lay = choose_layout(cfg, p.slots, tokens)
    prompt = torch.tensor([ids[:tokens]])
    from veil.backends.plain import TorchOps

    ops = TorchOps(cfg, w)
    emb = ops.embed(prompt)[0]
    with torch.inference_mode():
        ref = hidden_states(cfg, ops, prompt, Step(torch.arange(tokens)[None], None, 0),
                            ops.new_cache(1, tokens))[0, -1].double().numpy()
    layer_w = {k: v for k, v in w.items() if k.startswith("layers.")}
    t0 = time.perf_counter()
    eng = Engine.client(p, rotation_steps(cfg, lay))
    keys_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        h, he_ops = local_forward(cfg, layer_w, eng, lay, emb)
        total = time.perf_counter() - t0
    finally:
        eng.close()
    hc, _ = local_forward(cfg, layer_w, ClearEngine(p), lay, emb)

    h, hc = (_final_normed(ops, x)[0, 0].double().numpy() for x in (h, hc))
    scale = float(np.abs(ref).max())
    return {"model": opened.cfg.name, "layer": 0, "tokens": tokens, "params": PARAMS,
            "T": lay.T, "C": lay.C, "keygen_s": keys_s, "seconds": total,
            "categories": he_ops.cost.as_dict()["seconds"], "refreshes": len(he_ops.cost.refreshes),
            "refresh_detail": he_ops.cost.refreshes, "gs_iterations": he_ops.gs_iters,
            "max_abs_error": float(np.abs(h - ref).max()),
            "clear_max_abs_error": float(np.abs(hc - ref).max()), "max_abs_value": scale}


# ---- projection -----------------------------------------------------------------------------

def pythia_config(small: ModelConfig) -> ModelConfig:
    return small.with_(**PYTHIA)


def bench_projection(small_cfg: ModelConfig, small_weights: dict, measured: dict,
                     tokens: int, params: str = PARAMS) -> dict[str, Any]:
    p = he_params.get(params)
    costs = primitive_costs(p)
    big = he_params.get(PARAMS)                    # Pythia's shapes need the real set's slots
    big_costs = costs if big.name == p.name else primitive_costs(big)
    row = next(r for r in measured["rows"] if r["tokens"] == tokens and r["mask"])
    refresh_per_ct = row["categories"]["refresh"] / max(1, row["refresh_ciphertexts"])
    layer_w = {k: v for k, v in small_weights.items() if k.startswith("layers.")}
    check = plan(small_cfg, p, tokens, measured["setup"]["T"], layer_w)
    prim = project(check.tally, costs)
    projected = sum(prim.values()) + refresh_per_ct * check.summary()["refresh_ciphertexts"]
    counts_match = {k: (check.tally.by_kind().get(k, 0), row["primitives"].get(k, {}).get("count"))
                    for k in ("rotate", "pt_mul", "rescale")}
    py = pythia_config(small_cfg)
    pplan = plan(py, big, 128)
    pprim = project(pplan.tally, big_costs)
    prefresh = refresh_per_ct * pplan.summary()["refresh_ciphertexts"]
    return {"params": params, "primitive_costs": {f"{k}@{lv}": v for (k, lv), v in costs.items()},
            "refresh_s_per_ciphertext": refresh_per_ct,
            "check": {"model": small_cfg.name, "tokens": tokens,
                      "measured_server_s": row["server_s"]["median"],
                      "projected_s": projected, "counts (plan, measured)": counts_match,
                      "plan": check.summary()},
            "pythia": {"config": dict(PYTHIA), "tokens": 128, "params": big.name,
                       "plan": pplan.summary(), "seconds_by_primitive": pprim,
                       "refresh_s": prefresh, "total_s": sum(pprim.values()) + prefresh}}


# ---- run, write -----------------------------------------------------------------------------

def run(lengths: tuple[int, ...] = (8, 16, 32), repeats: int = 3, prompts: int = 100,
        agree_tokens: int = 16, new_tokens: int = 4, layer_tokens: int = 16,
        parts: tuple[str, ...] = ("forward", "generation", "agreement", "layer", "projection"),
        progress: bool = True, folder: Path | None = None, params: str = PARAMS,
        ids: list[int] | None = None) -> dict[str, Any]:
    """Every part (see the module docstring). `folder`, `params` and `ids` default to the small
    model, n16384 and held-out Shakespeare (tests pass a tiny model, an insecure set and ids)."""
    folder = _need(Path(folder) if folder else small_folder(), "small")
    plain = veil.load(str(folder))
    need = max(prompts * agree_tokens, max(lengths), layer_tokens)
    ids = list(ids) if ids is not None else heldout_ids(plain, need)
    if len(ids) < need:
        raise ConfigError(f"he bench: {len(ids)} prompt tokens, {need} needed")
    opened = open_model(str(folder))
    res: dict[str, Any] = {
        "meta": {"when": time.strftime("%Y-%m-%d"), "machine": platform.machine() + " CPU",
                 "python": platform.python_version(), "params": params,
                 "secure": he_params.get(params).secure,
                 "model": opened.cfg.name, "paper": PAPER},
        "model": {k: getattr(opened.cfg, k) for k in ("d_model", "n_layers", "n_heads", "d_ff",
                                                      "norm", "activation", "attention",
                                                      "power_p", "power_eps", "score_bound")}}
    try:
        if "forward" in parts:
            fw = bench_forward(folder, lengths, repeats, True, plain, ids, params)
            fw["rows"] += bench_forward(folder, lengths[-1:], repeats, False, plain, ids,
                                        params)["rows"]
            res["forward"] = fw
            if progress:
                print("he forward done", flush=True)
        if "generation" in parts:
            res["generation"] = bench_generation(folder, ids[:lengths[0]], new_tokens, params)
        if "agreement" in parts:
            res["agreement"] = bench_agreement(folder, prompts, agree_tokens, ids, plain,
                                               progress, params)
        if "layer" in parts:
            res["layer"] = bench_layer(layer_tokens, ids)
        if "projection" in parts and "forward" in res:
            res["projection"] = bench_projection(opened.cfg, opened.weights, res["forward"],
                                                 lengths[1] if len(lengths) > 1 else lengths[0],
                                                 params)
    finally:
        plain.close()
    return res


def _pct(part: float, total: float) -> str:
    return f"{100 * part / total:.0f}%" if total else "—"


def markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    L = ["# `he`: encrypted inference of a Power-Softmax model (CKKS)", "",
         f"{m['when']} · {m['machine']} · SEAL via TenSEAL · `{m['params']}` "
         f"({'128-bit' if m.get('secure', True) else 'INSECURE test set'}) · model "
         f"`{m['model']}` ({res['model']['n_layers']} layers, d={res['model']['d_model']}, "
         f"{res['model']['attention']} p={res['model']['power_p']}, "
         f"{res['model']['activation']} activation, {res['model']['norm']} norm). "
         "Regenerate: `veil bench he`.", ""]
    if "forward" in res:
        fw = res["forward"]
        s = fw["setup"]
        L += ["## One encrypted forward (the defaults of `veil.load(model, scheme=\"he\")`)", "",
              f"Layout T={s['T']} × C={s['C']}; {s['galois_steps']} Galois keys; keys sent once: "
              f"{s['key_bytes'] / 1e6:.0f} MB; session start {s['open_s']:.1f} s. Seconds: "
              "min / median / max over the repeats (client-measured, through the server "
              "process); categories are the server's, median.", "",
              "| tokens | masked refresh | seconds | " + " | ".join(CATEGORIES)
              + " | refreshes (cts) | levels used | MB → server | MB → client | max logit err |",
              "|---|---|---|" + "---|" * len(CATEGORIES) + "---|---|---|---|---|"]
        for r in fw["rows"]:
            sec = r["seconds"]
            cats = " | ".join(f"{r['categories'][c]:.2f}" for c in CATEGORIES)
            L.append(f"| {r['tokens']} | {'yes' if r['mask'] else 'no'} | {sec['min']:.1f} / "
                     f"**{sec['median']:.1f}** / {sec['max']:.1f} | {cats} | {r['refreshes']} "
                     f"({r['refresh_ciphertexts']}) | {r['levels_used']} | "
                     f"{r['bytes_to_server'] / 1e6:.0f} | {r['bytes_to_client'] / 1e6:.0f} | "
                     f"{r['max_logit_error']:.1e} |")
        r = next(x for x in fw["rows"] if x["mask"] and x["tokens"] == 128) \
            if any(x["tokens"] == 128 for x in fw["rows"]) else fw["rows"][len(fw["rows"]) // 2]
        tot = sum(r["categories"].values())
        prim = r["primitives"]
        L += ["", f"Shares at {r['tokens']} tokens beside the paper's (Pythia-70M, 128 tokens, "
              "A100): ours by category (refresh = the client round trips standing in for "
              "bootstrapping), and the primitives' own seconds.", "",
              "| category | ours | paper |", "|---|---|---|",
              f"| plain×cipher (matmul) | {_pct(r['categories']['plain×cipher'], tot)} | 30% |",
              f"| refresh / bootstrapping | {_pct(r['categories']['refresh'], tot)} | 19% |",
              f"| cipher×cipher | {_pct(r['categories']['cipher×cipher'], tot)} | 18% |",
              f"| softmax | {_pct(r['categories']['softmax'], tot)} | 9.5% |",
              f"| activation + norm | "
              f"{_pct(r['categories']['activation'] + r['categories']['norm'], tot)} | 8% |",
              f"| other (masks, last position) | {_pct(r['categories']['other'], tot)} | — |",
              f"| adds / rescales (primitive seconds) | "
              f"{_pct(prim.get('add', {}).get('s', 0) + prim.get('rescale', {}).get('s', 0), tot)}"
              f" | 16% |",
              f"| rotations (primitive seconds) | {_pct(prim.get('rotate', {}).get('s', 0), tot)} "
              "| — |"]
    if "generation" in res:
        g = res["generation"]
        L += ["", f"**Generation** (`generate`, {g['prompt_tokens']}-token prompt, "
              f"{g['new_tokens']} new tokens): {g['s_per_token']:.1f} s per token "
              f"({g['total_s']:.0f} s in all); tokens identical to plaintext's: "
              f"{'yes' if g['same_tokens_as_plain'] else 'NO'}. Each token is a forward of the "
              "whole sequence (no KV cache under encryption)."]
    if "agreement" in res:
        a = res["agreement"]
        L += ["", f"## Next-token agreement ({a['prompts']} held-out prompts of {a['tokens']} "
              "tokens)", "",
              "| | greedy next token = plaintext's | max logit error, median | max |",
              "|---|---|---|---|",
              f"| encrypted (`{a['params']}`) | **{100 * a['encrypted_vs_plain']:.0f}%** | "
              f"{a['enc_err_median']:.1e} | {a['enc_err_max']:.1e} |",
              f"| same algorithm on clear slots | {100 * a['clear_vs_plain']:.0f}% | "
              f"{a['clear_err_median']:.1e} | {a['clear_err_max']:.1e} |",
              "", f"Encrypted = clear in {100 * a['encrypted_vs_clear']:.0f}% of prompts; the "
              f"paper: 99%. {a['seconds_median']:.1f} s per encrypted forward (median; this "
              "part may run beside other work — the timed figures are the table above)."]
    if "layer" in res:
        y = res["layer"]
        tot = y["seconds"]
        L += ["", f"## One layer of the converted default model (`{y['model']}`, layer 0, "
              f"{y['tokens']} tokens, in-process)", "",
              f"Layout T={y['T']} × C={y['C']}; {tot:.1f} s ({y['keygen_s']:.1f} s of keys "
              f"besides); {y['refreshes']} refreshes; Goldschmidt {y['gs_iterations']} "
              f"iterations. Hidden state error: {y['max_abs_error']:.1e} encrypted, "
              f"{y['clear_max_abs_error']:.1e} on clear slots (values up to "
              f"{y['max_abs_value']:.1f}).", "",
              "| " + " | ".join(y["categories"]) + " |",
              "|" + "---|" * len(y["categories"]),
              "| " + " | ".join(f"{v:.1f}" for v in y["categories"].values()) + " |"]
    if "projection" in res:
        pj = res["projection"]
        c, py = pj["check"], pj["pythia"]
        ps = py["plan"]
        L += ["", "## Projection: depth plan × this machine's primitive timings", "",
              f"Check on the small model at {c['tokens']} tokens: projected {c['projected_s']:.1f} s"
              f", measured {c['measured_server_s']:.1f} s (server side; counts plan / measured: "
              + ", ".join(f"{k} {a}/{b}" for k, (a, b) in c["counts (plan, measured)"].items())
              + ").", "",
              f"Pythia-70M shapes (d 512, 6 layers, 8 heads, d_ff 2048; poly norm and "
              f"activation), 128 tokens, `{py['params']}`: **{py['total_s'] / 60:.0f} min** on "
              f"one core here ({ps['refreshes']} refreshes of {ps['refresh_ciphertexts']} "
              f"ciphertexts: {py['refresh_s']:.0f} s; {ps['primitives'].get('rotate', 0)} "
              f"rotations, {ps['primitives'].get('pt_mul', 0)} plaintext products, "
              f"{ps['primitives'].get('ct_mul', 0) + ps['primitives'].get('ct_mul_raw', 0)} "
              f"ciphertext products) — the paper: {PAPER['total_s']:.0f} s on an A100 (HEaaN, "
              "GPU bootstrapping).", "",
              "| primitive | seconds |", "|---|---|"]
        for k, v in sorted(py["seconds_by_primitive"].items(), key=lambda kv: -kv[1]):
            L.append(f"| {k} | {v:.0f} |")
    return "\n".join(L) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res.get("forward", {}).get("rows", []) if r["mask"]]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bottom = np.zeros(len(rows))
    x = [str(r["tokens"]) for r in rows]
    for c in CATEGORIES:
        v = np.array([r["categories"][c] for r in rows])
        ax.bar(x, v, bottom=bottom, label=c)
        bottom += v
    ax.set_xlabel("tokens")
    ax.set_ylabel("server seconds per forward")
    ax.set_title(f"Encrypted forward, {res['meta']['model']} ({res['meta']['params']})")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def write(res: dict[str, Any], out_dir: str | Path = RESULTS) -> list[Path]:
    return write_results(out_dir, "he", res, markdown(res), plot)


def main(argv: list[str] | None = None) -> None:
    """`python -m veil.bench.he [--repeats 3] [--prompts 100] [--parts forward,agreement,…]`"""
    ap = argparse.ArgumentParser(prog="python -m veil.bench.he")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--lengths", default="8,16,32")
    ap.add_argument("--parts", default="forward,generation,agreement,layer,projection")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--merge", default=None,
                    help="an earlier he.json whose parts this run's parts are added to (run the "
                         "timed parts on a quiet machine, the long agreement beside other work)")
    a = ap.parse_args(argv)
    lengths = tuple(int(x) for x in a.lengths.split(","))
    res = run(lengths, a.repeats, a.prompts, parts=tuple(a.parts.split(",")))
    if a.merge:
        earlier = json.loads(Path(a.merge).read_text())
        res = {**earlier, **{k: v for k, v in res.items() if k not in ("meta", "model")}}
    for p in write(res, a.out):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
