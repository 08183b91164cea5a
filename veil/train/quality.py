"""Quality of a model variant on held-out text, two ways.

  teacher-forced  perplexity and next-token accuracy with the true tokens as input (`model.logits`);
  free-running    from a 4-token prefix of each window, generate greedily the way the model
                  generates (standard, or resending its hidden states) and score the tokens
                  against the text that follows: what embedding resending costs shows up here,
                  since a resent state that misses the next token's embedding is never corrected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import veil
from veil.eval import perplexity
from veil.model.generate import SamplingConfig, generate_ids

PREFIX = 4


def _free_running(model, ids: list[int], window: int, windows: int) -> float:
    hits = total = 0
    for w in range(windows):
        chunk = ids[w * window:(w + 1) * window]
        rows, _ = generate_ids(model.cfg, model.ops, [chunk[:PREFIX]],
                               SamplingConfig(max_new_tokens=window - PREFIX, stop_on_eos=False))
        got = rows[0].token_ids
        hits += sum(int(a == b) for a, b in zip(got, chunk[PREFIX:]))
        total += len(chunk) - PREFIX
    return hits / total


def quality_table(models: dict[str, Path], heldout: np.ndarray, window: int, windows: int
                  ) -> dict:
    ids = [int(t) for t in heldout[:window * windows]]
    rows = []
    for name, folder in models.items():
        model = veil.load(folder)
        tf = perplexity(model, ids, window=min(window, model.cfg.max_seq_len - 1),
                        max_windows=windows)
        rows.append({"model": name, "generation": model.cfg.generation,
                     "attention": model.cfg.attention, "perplexity": tf.perplexity,
                     "top1_accuracy": tf.top1_accuracy,
                     "free_running_accuracy": _free_running(model, ids, min(
                         window, model.cfg.max_seq_len - 1), windows),
                     "folder": str(folder)})
    return {"window": window, "windows": windows, "prefix": PREFIX, "rows": rows}


def markdown(table: dict) -> str:
    lines = ["| model | generation | attention | perplexity | next-token acc. | free-running acc. |",
             "|---|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['model']} | {r['generation']} | {r['attention']} | "
                     f"{r['perplexity']:.1f} | {r['top1_accuracy']:.3f} | "
                     f"{r['free_running_accuracy']:.3f} |")
    return "\n".join(lines)
