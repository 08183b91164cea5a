"""The KV-cache inversion benchmark (issue #15): how much of a conversation each scheme's untrusted
side gives back, per scheme × adversary view.

Windows: 50 held-out Shakespeare windows of 64 tokens at fixed offsets (evenly spaced over the
held-out token stream); the first 8 tokens of each count as known to the attacker (a chat
template's fixed prefix stands for them), and every rate is over the other 56. Each window is one
prompt's prefill under the scheme (thread device, recording), attacked with everything in
veil/attacks/kv_inversion.py that applies. Views: `snapshot` (resident weights + KV cache) and
`device` (also every tensor received). Per scheme and view the table reports the attack with the
best mean rate — one attack chosen for all windows, as an attacker would have to — with its
per-position recovery rate (mean, min, max over windows) and the share of windows read back
whole. A second table runs the padded mode on long conversations (512 tokens), where principal
subspaces have enough rows to separate pads from values.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import veil
from veil.attacks.kv_inversion import DEVICE, SNAPSHOT, Recorder, Vocabulary, attack_view
from veil.data import corpus_text
from veil.eval import perplexity
from veil.train.finetune import finetune

# (label, scheme, options): the registry's defaults first, then each mode an attacker might meet
CONTENDERS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("plain", "plain", {}),
    ("kvshield", "kvshield", {}),
    ("kvshield pad_scale=1", "kvshield", {"pad_scale": 1.0}),
    ("kvshield permute", "kvshield", {"mixing": "permute"}),
    ("kvshield rotate", "kvshield", {"mixing": "rotate"}),
    ("kvshield-paper (permute, fold)", "kvshield", {"mixing": "permute", "fold": True}),
    ("kvshield rotate, fold", "kvshield", {"mixing": "rotate", "fold": True}),
    ("loro", "loro", {}),
    ("tlg", "tlg", {}),
    ("shadownet", "shadownet", {}),
)
LONG_CONTENDERS = (("kvshield", "kvshield", {}),
                   ("kvshield pad_scale=1", "kvshield", {"pad_scale": 1.0}))
# attack 4: schemes that protect a private (fine-tuned) model, attacked with the public prior's
# tables — kvshield is left out: its device holds the weights in the clear by design
PRIVATE_CONTENDERS = (("plain", "plain", {}), ("loro", "loro", {}), ("tlg", "tlg", {}))


def victim(model: str, steps: int) -> Path:
    """`model` fully fine-tuned on the Shakespeare train split (`steps` AdamW steps of 8 × 64
    tokens, lr 1e-4), saved as a veil model folder in the cache (made once)."""
    return finetune(model, steps, progress=False)


def windows(model: Any, count: int, length: int) -> tuple[list[list[int]], str]:
    """`count` windows of `length` tokens at evenly spaced offsets of the held-out split (random
    ids from a fixed seed for a model without a tokenizer: the tiny presets)."""
    if model.tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return ([torch.randint(0, model.cfg.vocab_size, (length,), generator=g).tolist()
                 for _ in range(count)], "random ids (seed 0): the model has no tokenizer")
    ids = model.encode(corpus_text("shakespeare", "heldout"))
    stride = (len(ids) - length) // count
    return ([ids[i * stride:i * stride + length] for i in range(count)],
            f"held-out Shakespeare, offsets i·{stride} (i < {count})")


def _measure(model_name: str, vocab: Vocabulary, wins: list[list[int]], known: int,
             contenders: tuple[tuple[str, str, dict[str, Any]], ...]) -> dict[str, Any]:
    """Per contender: each attack's rate per window, by view."""
    out: dict[str, Any] = {}
    for label, scheme, opts in contenders:
        rec = Recorder(model_name, scheme, **opts)
        per: dict[str, dict[str, list[float]]] = {SNAPSHOT: {}, DEVICE: {}}
        try:
            for ids in wins:
                for r in attack_view(vocab, rec.view(ids), ids, DEVICE, known):
                    views = (DEVICE,) if r.attack.startswith("inputs") else (SNAPSHOT, DEVICE)
                    for v in views:
                        per[v].setdefault(r.attack, []).append(r.recovered)
        finally:
            rec.close()
        out[label] = {"scheme": scheme, "options": opts, "attacks": per}
    return out


def _summary(attacks: dict[str, list[float]]) -> dict[str, Any]:
    """Per-window rates by attack → the attack with the best mean, its mean, range and share of
    windows read whole, and every attack's mean (nothing to attack: best None)."""
    if not attacks:
        return {"best": None, "mean": 0.0, "min": 0.0, "max": 0.0, "whole_windows": 0.0,
                "attacks": {}}
    best = max(attacks, key=lambda a: statistics.mean(attacks[a]))
    rates = attacks[best]
    return {"best": best, "mean": statistics.mean(rates), "min": min(rates), "max": max(rates),
            "whole_windows": sum(r == 1.0 for r in rates) / len(rates),
            "attacks": {a: statistics.mean(v) for a, v in attacks.items()}}


def _rows(measured: dict[str, Any], window: int, known: int) -> list[dict[str, Any]]:
    return [{"label": label, "scheme": m["scheme"], "options": m["options"], "view": view,
             "window": window, "known": known, **_summary(m["attacks"][view])}
            for label, m in measured.items() for view in (SNAPSHOT, DEVICE)]


def private_rows(model: str, steps: int, wins: list[list[int]], known: int
                 ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Attack 4: the fine-tuned victim under each scheme, its snapshot attacked with the public
    prior's tables (`prior`) and, for reference, with the victim's own (`own`); and the held-out
    perplexity of prior and victim (the fine-tune is real)."""
    folder = victim(model, steps)
    rows = []
    with veil.load(model) as prior, veil.load(folder) as own:
        held = prior.encode(corpus_text("shakespeare", "heldout")[:200_000])
        ppl = {"prior": perplexity(prior, held, 64, 16).perplexity,
               "victim": perplexity(own, held, 64, 16).perplexity}
        tables = {"prior": Vocabulary(prior.cfg, prior.ops.w), "own": Vocabulary(own.cfg, own.ops.w)}
        for label, scheme, opts in PRIVATE_CONTENDERS:
            rec = Recorder(str(folder), scheme, **opts)
            try:
                views = [rec.view(ids) for ids in wins]
            finally:
                rec.close()
            for which, vocab in tables.items():
                per: dict[str, list[float]] = {}
                for seen, ids in zip(views, wins):
                    for r in attack_view(vocab, seen, ids, SNAPSHOT, known):
                        per.setdefault(r.attack, []).append(r.recovered)
                rows.append({"label": label, "tables": which, **_summary(per)})
    return rows, ppl


def run(model: str = "default", count: int = 50, window: int = 64, known: int = 8,
        long_count: int = 5, long_window: int = 512, private_count: int = 10,
        finetune_steps: int = 60, out_dir: str | Path = "benchmarks/results") -> list[Path]:
    """Run the benchmark; write kv_inversion.json, .md and .png under `out_dir`. private_count:
    windows for attack 4 (0: skip; needs a tokenizer, the fine-tune runs on the corpus)."""
    t0 = time.time()
    with veil.load(model) as m:
        vocab = Vocabulary(m.cfg, m.ops.w)
        wins, source = windows(m, count, window)
        long_window = min(long_window, m.cfg.max_seq_len - 1)
        long_wins, _ = windows(m, long_count, long_window) if long_count else ([], "")
    rows = _rows(_measure(model, vocab, wins, known, CONTENDERS), window, known)
    long_rows = ([r for r in _rows(_measure(model, vocab, long_wins, known, LONG_CONTENDERS),
                                   long_window, known) if r["view"] == SNAPSHOT]
                 if long_wins else [])
    private, ppl = (private_rows(model, finetune_steps, wins[:private_count], known)
                    if private_count and source.startswith("held-out") else ([], {}))
    meta = {"when": time.strftime("%Y-%m-%d"), "model": model, "windows": count,
            "window": window, "known": known, "source": source, "long_windows": long_count,
            "long_window": long_window, "private_windows": private_count if private else 0,
            "finetune_steps": finetune_steps, "ppl": ppl, "seconds": round(time.time() - t0)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "kv_inversion.json", out / "kv_inversion.md", out / "kv_inversion.png"]
    paths[0].write_text(json.dumps({"meta": meta, "rows": rows, "long_rows": long_rows,
                                    "private_rows": private}, indent=2) + "\n")
    paths[1].write_text(markdown(meta, rows, long_rows, private))
    _plot(rows, paths[2])
    return paths


def _fmt_row(r: dict[str, Any]) -> str:
    if r["best"] is None:
        return f"| {r['label']} | {r['view']} | — (nothing to read) | — | — | — | — |"
    others = ", ".join(f"{a} {v:.0%}" for a, v in sorted(r["attacks"].items(),
                                                        key=lambda kv: -kv[1]) if a != r["best"])
    return (f"| {r['label']} | {r['view']} | {r['best']} | {r['mean']:.1%} | "
            f"{r['min']:.0%}–{r['max']:.0%} | {r['whole_windows']:.0%} | {others} |")


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], long_rows: list[dict[str, Any]],
             private: list[dict[str, Any]] | None = None) -> str:
    head = ["| scheme | view | best attack | tokens recovered (mean) | per-window range | "
            "windows read whole | the other attacks (mean) |", "|---|---|---|---|---|---|---|"]
    out = ["# kv_inversion", "",
           f"{meta['when']} · {meta['model']} · {meta['windows']} windows of {meta['window']} "
           f"tokens ({meta['source']}) · the first {meta['known']} tokens of each known to the "
           "attacker, rates over the rest · one prefill per window, thread device recording · "
           f"{meta['seconds']} s. Attacks: veil/attacks/kv_inversion.py; `snapshot` = what the "
           "device holds (weights, KV cache), `device` = that plus everything it received. "
           "Regenerate: `veil bench kv-inversion`.", "", *head]
    out += [_fmt_row(r) for r in rows]
    if long_rows:
        out += ["", f"## Long conversations ({meta['long_windows']} windows of "
                f"{meta['long_window']} tokens, snapshot view)", "",
                "More cached rows than dimensions per head: the `pca` attack can separate the pad "
                "subspace from the values'.", "", *head]
        out += [_fmt_row(r) for r in long_rows]
    if private:
        p = meta["ppl"]
        out += ["", f"## Private weights (attack 4: {meta['private_windows']} windows, snapshot "
                "view)", "",
                f"The model fully fine-tuned on the Shakespeare train split ({meta['finetune_steps']}"
                f" AdamW steps of 8 × 64 tokens; held-out perplexity {p['prior']:.1f} → "
                f"{p['victim']:.1f}) runs under each scheme; the attacker tabulates layer 0 from "
                "the public prior (`prior`), or — the reference — from the victim itself (`own`).",
                "", "| scheme | attacker's tables | best attack | tokens recovered (mean) | "
                "per-window range | windows read whole |", "|---|---|---|---|---|---|"]
        out += [f"| {r['label']} | {r['tables']} | {r['best']} | {r['mean']:.1%} | "
                f"{r['min']:.0%}–{r['max']:.0%} | {r['whole_windows']:.0%} |" for r in private]
    return "\n".join(out) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 3.6))
    width = 0.4
    for k, (view, color) in enumerate(((SNAPSHOT, "#4c72b0"), (DEVICE, "#dd8452"))):
        by = {r["label"]: r for r in rows if r["view"] == view}
        xs = [i + (k - 0.5) * width for i in range(len(labels))]
        mean = [by[lab]["mean"] for lab in labels]
        err = [[by[lab]["mean"] - by[lab]["min"] for lab in labels],
               [by[lab]["max"] - by[lab]["mean"] for lab in labels]]
        ax.bar(xs, mean, width, yerr=err, capsize=3, color=color, label=f"{view} view")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("tokens recovered (best attack)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(f"KV-cache inversion · {rows[0]['window']}-token windows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    import sys

    for p in run(*(sys.argv[1:2] or ["default"])):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
