"""`veil train power`: Power-Softmax models (variants/power.py) for the HE backend, and their
quality table.

  target "default"  the default model (SmolLM2-135M, all 30 layers or the first `layers`) converted
                    — power attention (queries rescaled so scores start inside ±B), the activation's
                    polynomial fit, RMS norm kept — and distilled from the original:
                    kd·KL(teacher ‖ student) + ce·CE + λ·range loss on Shakespeare's train split;
  target "small"    a 2-layer d=128 polynomial model (power attention, polynomial activation and
                    norm, plain MLP, RoPE) with the default model's tokenizer, trained from its
                    embedding's principal components with ce·CE + λ·range loss — small enough to
                    run end to end under encryption. `softmax=True` trains the same architecture
                    with softmax/SiLU/RMS norm: the baseline it is compared against.

Both resume from their checkpoints (trainer.Run) and end as native model folders in the cache
(`zoo.cache_dir()/power/<name>/model`). `python -m veil.train.power_recipe` runs every target (a
finished one is only re-saved) and writes benchmarks/results/power_quality.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import veil
from veil.backends.plain import TrainCache
from veil.errors import ConfigError
from veil.eval import perplexity
from veil.model import native, zoo
from veil.model.config import ModelConfig, RopeConfig
from veil.model.forward import hidden_states
from veil.model.opening import open_model
from veil.model.ops import Step
from veil.model.weights import Weights, expected_shapes, validate
from veil.train.merge_recipe import corpus_tokens, reduced, sequence_logits
from veil.train.trainer import Run, TrainSettings, batch_at, train
from veil.variants.power import (ACT_BOUND, ACT_DEGREE, NORM_DEGREE, NORM_RANGE, POWER_EPS, POWER_P,
                                 SCORE_BOUND, RangeOps, calibrate_scores, convert_weights,
                                 goldschmidt_iterations, range_stats, variant_config)

TARGETS = ("default", "small")
TRAIN_CHARS = 3_000_000
HELDOUT_CHARS = 400_000
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def default_settings(target: str) -> TrainSettings:
    """Sized for ≲ 20 minutes each on a shared 2-core CPU (measured: a distillation step of the
    30-layer model on 4×64 tokens, its teacher included, 2.2 s alone and 10–25 s when the cores
    are shared; a step of the small model on 8×64 0.17 s alone)."""
    if target == "default":
        return TrainSettings(steps=120, batch=4, seq=64, lr=3e-4, warmup=10, checkpoint_every=40)
    return TrainSettings(steps=2000, batch=8, seq=64, lr=3e-3, warmup=50, checkpoint_every=500)


@dataclass(frozen=True)
class PowerRecipe:
    target: str = "default"             # default | small
    model: str = "default"              # the original: teacher, tokenizer, the small model's init
    layers: int = 0                     # target default: keep the first N layers (0 = all)
    p: int = POWER_P
    eps: float = POWER_EPS
    bound: float = SCORE_BOUND
    act_bound: float = ACT_BOUND
    degree: int = ACT_DEGREE
    norm: str = ""                      # keep | poly; "" → keep (default), poly (small)
    norm_lo: float = NORM_RANGE[0]
    norm_hi: float = NORM_RANGE[1]
    norm_degree: int = NORM_DEGREE
    kd: float = -1.0                    # weight of KL(teacher ‖ student); < 0 → 1 (default), 0 (small)
    ce: float = -1.0                    # weight of the next-token CE; < 0 → 0.25 (default), 1 (small)
    range_weight: float = 1.0           # λ of the range loss
    # weight of the range loss's per-row denominator term (HE's 1/z range): the model wants u
    # large — a row's weights sum to u/(ε+u) — and at 1 the small model still reached z = 24
    # on 2% of rows (the first positions, with one or two keys)
    range_rows: float = 30.0
    softmax: bool = False               # target small: the softmax/SiLU/RMS baseline instead
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    context: int = 64
    embed_init: str = "project"         # small: project (the original's principal components) | random
    settings: TrainSettings | None = None
    corpus: str = "shakespeare"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r} (known: {', '.join(TARGETS)})")
        if self.norm not in ("", "keep", "poly"):
            raise ConfigError(f"norm must be 'keep' or 'poly', got {self.norm!r}")
        if self.embed_init not in ("project", "random"):
            raise ConfigError(f"embed_init must be 'project' or 'random', got {self.embed_init!r}")
        if self.softmax and self.target != "small":
            raise ConfigError("softmax=True is the small target's baseline")
        if self.range_weight < 0 or self.range_rows < 0:
            raise ConfigError(f"range_weight and range_rows must be ≥ 0, got {self.range_weight}, "
                              f"{self.range_rows}")
        s = self.train_settings
        if s.seq > self.context:
            raise ConfigError(f"training windows of {s.seq} tokens exceed the context {self.context}")

    @property
    def train_settings(self) -> TrainSettings:
        return self.settings or default_settings(self.target)

    @property
    def norm_kind(self) -> str:
        return self.norm or ("keep" if self.target == "default" else "poly")

    @property
    def weights(self) -> tuple[float, float]:
        """(kd, ce) with the per-target defaults filled in."""
        kd = self.kd if self.kd >= 0 else (1.0 if self.target == "default" else 0.0)
        ce = self.ce if self.ce >= 0 else (0.25 if self.target == "default" else 1.0)
        return kd, ce

    def name(self) -> str:
        if self.target == "default":
            base = Path(str(self.model)).name.replace(".", "_")
            return f"{base}-{self.layers or 'all'}L-power"
        arch = f"small-{self.n_layers}L-d{self.d_model}-ff{self.d_ff}"
        init = "-randemb" if self.embed_init == "random" else ""
        return arch + ("-softmax" if self.softmax else "-power") + init


def default_out(r: PowerRecipe) -> Path:
    return zoo.cache_dir() / "power" / r.name()


def _full(T: int, B: int) -> Step:
    return Step(torch.arange(T).expand(B, T), None, 0)


def power_loss(cfg: ModelConfig, r: PowerRecipe, teacher: tuple[ModelConfig, Weights] | None):
    """kd·KL(teacher ‖ student) + ce·CE + λ·range loss, through veil's forward (RangeOps)."""
    kd_w, ce_w = r.weights

    def loss(params: Weights, ids: torch.Tensor, gen: torch.Generator):
        B, T = ids.shape
        ops = RangeOps(cfg, params, r.range_rows)
        logits = ops.lm_head(hidden_states(cfg, ops, ids, _full(T, B), TrainCache(cfg, B, T)))
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        rng = ops.stats.loss()
        total = ce_w * ce + r.range_weight * rng
        metrics = {"ce": float(ce.detach()), "range": float(rng.detach()),
                   **{f"out_{k}": v for k, v in ops.stats.fractions().items()}}
        if kd_w > 0 and teacher is not None:
            with torch.no_grad():
                target = F.log_softmax(sequence_logits(*teacher, ids).float(), -1)
            kl = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), target.flatten(0, 1),
                          log_target=True, reduction="batchmean")
            total = total + kd_w * kl
            metrics["kl"] = float(kl.detach())
        return total, metrics
    return loss


def small_config(r: PowerRecipe, base: ModelConfig) -> ModelConfig:
    """The small model: the original's vocabulary and special tokens, 2 layers, plain MLP, RoPE;
    Power-Softmax knobs unless `softmax` (then softmax attention, SiLU and RMS norm)."""
    cfg = ModelConfig(family="llama", vocab_size=base.vocab_size, d_model=r.d_model,
                      n_layers=r.n_layers, n_heads=r.n_heads, n_kv_heads=r.n_heads, d_ff=r.d_ff,
                      max_seq_len=r.context, norm="rms", activation="silu", mlp="plain",
                      position="rope", rope=RopeConfig(theta=10000.0), tie_embeddings=True,
                      bos_token_id=base.bos_token_id, eos_token_ids=base.eos_token_ids,
                      pad_token_id=base.pad_token_id, name=r.name())
    if r.softmax:
        return cfg
    return variant_config(cfg, r.p, r.eps, r.bound, r.act_bound, r.degree, r.norm_kind,
                          (r.norm_lo, r.norm_hi), r.norm_degree).with_(name=r.name())


def small_weights(cfg: ModelConfig, r: PowerRecipe, base_embed: torch.Tensor) -> Weights:
    """GPT-2-style init (std 0.02, output projections scaled by 1/√(2·layers)); the tied
    embedding the original's projected onto its top `d_model` principal directions (or random),
    each row at RMS 1 (the first norm's mean square starts at 1, inside [norm_lo, norm_hi]); the
    final norm at 1/√d so the tied head's logits start at unit scale."""
    gen = torch.Generator().manual_seed(r.seed)
    w: Weights = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            w[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            w[name] = torch.zeros(shape)
        else:
            std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith((".o.weight", "down.weight")) \
                else 0.02
            w[name] = std * torch.randn(shape, generator=gen)
    if r.embed_init == "project":
        E = base_embed.double()
        E = E - E.mean(0, keepdim=True)
        _, _, V = torch.linalg.svd(E[::4], full_matrices=False)             # (d_base, d_base)
        emb = (E @ V[:cfg.d_model].T).float()
    else:
        emb = torch.randn(cfg.vocab_size, cfg.d_model, generator=gen)
    w["embed.weight"] = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()
    w["final_norm.weight"] = torch.full((cfg.d_model,), 1 / math.sqrt(cfg.d_model))
    validate(w, cfg, "small model")
    return w


def _tokens(opened, corpus: str) -> dict[str, np.ndarray]:
    if opened.tokenizer is None:
        raise ConfigError(f"{opened.source}: no tokenizer; `veil train power` needs one")
    return {"train": corpus_tokens(opened.tokenizer, corpus, "train", TRAIN_CHARS),
            "heldout": corpus_tokens(opened.tokenizer, corpus, "heldout", HELDOUT_CHARS)}


def run_recipe(r: PowerRecipe, out: Path | None = None, progress: bool = True,
               tokens: dict | None = None) -> Path:
    """Train (or resume) the target and save it; returns the model folder (`out`/model)."""
    out = Path(out) if out is not None else default_out(r)
    s = r.train_settings
    opened = open_model(r.model)
    tokens = tokens or _tokens(opened, r.corpus)
    calib = [batch_at(tokens["train"], 1_000_000 + i, s) for i in range(2)]
    teacher = None
    if r.target == "default":
        base_cfg, base_w = reduced(opened.cfg, opened.weights, r.layers)
        teacher = (base_cfg, base_w)
        cfg = variant_config(base_cfg, r.p, r.eps, r.bound, r.act_bound, r.degree, r.norm_kind,
                             (r.norm_lo, r.norm_hi), r.norm_degree).with_(name=r.name())
        params = calibrate_scores(cfg, convert_weights(base_cfg, base_w, cfg), calib)
        native.save_native(out / "init", cfg, params, opened.folder)
    else:
        cfg = small_config(r, opened.cfg)
        params = small_weights(cfg, r, opened.weights["embed.weight"])
        if r.weights[0] > 0:
            teacher = (opened.cfg, opened.weights)
    params = {k: v.clone() for k, v in params.items()}
    tag = {"recipe": {k: v for k, v in asdict(r).items() if k != "settings"}}
    train(params, power_loss(cfg, r, teacher), tokens["train"], s, Run(out / "run", s, tag),
          f"power ({r.name()})", progress=progress)
    return native.save_native(out / "model", cfg, {k: v.detach() for k, v in params.items()},
                              opened.folder)


# ---- the quality table ----------------------------------------------------------------------

@dataclass
class Row:
    model: str
    folder: str
    reference: str                      # the row whose greedy tokens this one is compared with
    metrics: dict = field(default_factory=dict)


def _greedy(model, windows: list[list[int]]) -> torch.Tensor:
    return torch.stack([model.logits([w])[0].argmax(-1) for w in windows])   # (N, T)


def quality_rows(rows: list[Row], heldout: np.ndarray, window: int = 63, windows: int = 100
                 ) -> dict:
    """Per model over the same `windows` held-out windows of `window` tokens: perplexity and
    top-1 (veil/eval.py), how often its greedy next token equals its reference's (every position
    of every window), and the fraction of attention scores / activation inputs / norm
    mean-squares outside the config's bounds."""
    ids = [int(t) for t in heldout[:window * windows]]
    if len(ids) < window * windows:
        raise ConfigError(f"held-out text has {len(heldout)} tokens, fewer than {windows}×{window}")
    chunks = [ids[i * window:(i + 1) * window] for i in range(windows)]
    greedy: dict[str, torch.Tensor] = {}
    out = []
    for row in rows:
        model = veil.load(row.folder)
        res = perplexity(model, ids, window=window, max_windows=windows)
        greedy[row.model] = _greedy(model, chunks)
        cfg = model.cfg
        stats = range_stats(cfg, open_model(row.folder).weights, torch.tensor(chunks))
        ref = greedy.get(row.reference)
        if ref is None:
            raise ConfigError(f"row {row.model!r}: reference {row.reference!r} must come before it")
        row.metrics = {
            "perplexity": res.perplexity, "top1_accuracy": res.top1_accuracy,
            "greedy_agreement": float((greedy[row.model] == ref).float().mean()),
            "attention": cfg.attention, "activation": cfg.activation, "norm": cfg.norm,
            "layers": cfg.n_layers, "d_model": cfg.d_model,
            "outside": stats.fractions(),
            "score_peak": max(stats.score_peak.values()) if stats.score_peak else None,
            "z_peak": max(stats.z_peak.values()) if stats.z_peak else None}
        out.append({"model": row.model, "reference": row.reference, "folder": row.folder,
                    **row.metrics})
    return {"window": window, "windows": windows, "rows": out}


def markdown(table: dict, recipes: dict[str, dict]) -> str:
    def pct(v):
        return "—" if v is None else f"{100 * v:.2f}%"

    def zp(v):
        return "—" if v is None else f"{v:.2f}"

    lines = ["| model | attention / act. / norm | layers × d | perplexity | top-1 | "
             "greedy = reference | reference | scores > B | rows u > B^p | peak z | act. inputs > R | "
             "norm u ∉ range |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        o = r["outside"]
        lines.append(f"| {r['model']} | {r['attention']} / {r['activation']} / {r['norm']} | "
                     f"{r['layers']} × {r['d_model']} | {r['perplexity']:.1f} | "
                     f"{r['top1_accuracy']:.3f} | {r['greedy_agreement']:.3f} | {r['reference']} "
                     f"| {pct(o.get('scores'))} | {pct(o.get('rows'))} | {zp(r.get('z_peak'))} "
                     f"| {pct(o.get('act'))} | {pct(o.get('norm'))} |")
    head = [f"Held-out Shakespeare (the train/held-out split of veil/data.py), the same "
            f"{table['windows']} windows of {table['window']} tokens for every model; greedy = "
            "reference: the share of positions whose argmax next token equals the reference "
            "model's. Bounds: B on |s|, B^p on each query row's mean |s|^p (u, the length-agnostic "
            "denominator), R on activation inputs, [norm_lo, norm_hi] on the poly norm's mean "
            "square (— : no such bound in that model). Peak z: the largest (u + ε)/(ε + B^p) seen, "
            "the input of HE's Goldschmidt reciprocal (accurate to its tolerance up to 1, "
            "divergent from 2).", ""]
    tail = ["", "Recipes (`veil train power`; table: `python -m veil.train.power_recipe`):", ""]
    for name, rec in recipes.items():
        tail.append(f"- **{name}**: {json.dumps(rec)}")
    return "\n".join(head + lines + tail) + "\n"


def _trained(r: PowerRecipe) -> str:
    folder = default_out(r) / "model"
    if not (folder / "veil_model.json").is_file() or not (default_out(r) / "run" /
                                                          "state.json").is_file():
        raise ConfigError(f"{folder}: not trained; run without --no-train")
    return folder


def recipes_for_table() -> list[PowerRecipe]:
    """The converted default model, the small model, its softmax baseline, and the small model
    from a random embedding (what the projected initialisation buys)."""
    return [PowerRecipe(target="default"), PowerRecipe(target="small"),
            PowerRecipe(target="small", softmax=True),
            PowerRecipe(target="small", embed_init="random")]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train every Power-Softmax target (resuming) and "
                                             "write benchmarks/results/power_quality.{md,json}")
    ap.add_argument("--windows", type=int, default=100)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-train", action="store_true",
                    help="evaluate the models already trained, each with the recipe its "
                         "checkpoint records (which may predate the current defaults)")
    args = ap.parse_args(argv)
    recipes = recipes_for_table()
    if args.no_train:
        folders = {r.name(): _trained(r) for r in recipes}
    else:
        folders = {r.name(): run_recipe(r) for r in recipes}
    opened = open_model("default")
    heldout = _tokens(opened, "shakespeare")["heldout"]
    default, small, baseline, random_embed = recipes
    rows = [Row("original (SmolLM2-135M)", str(opened.folder), "original (SmolLM2-135M)"),
            Row("converted, before training", str(default_out(default) / "init"),
                "original (SmolLM2-135M)"),
            Row("converted (Power-Softmax)", str(folders[default.name()]),
                "original (SmolLM2-135M)"),
            Row("small softmax baseline", str(folders[baseline.name()]), "small softmax baseline"),
            Row("small Power-Softmax", str(folders[small.name()]), "small softmax baseline"),
            Row("small Power-Softmax, random embedding", str(folders[random_embed.name()]),
                "small softmax baseline")]
    table = quality_rows(rows, heldout, windows=args.windows)
    recs = {}
    for r in recipes:
        kd, ce = r.weights
        d = {k: v for k, v in asdict(r).items() if k not in ("settings", "kd", "ce")}
        recs[r.name()] = {**d, "kd": kd, "ce": ce, "norm": r.norm_kind,
                          "settings": asdict(r.train_settings),
                          "goldschmidt_iterations": goldschmidt_iterations(r.eps, r.bound, r.p)}
    if args.no_train:        # what each model was really trained with
        for r in recipes:
            used = json.loads((default_out(r) / "run" / "state.json").read_text())["identity"]
            kd, ce = r.weights
            recs[r.name()] = {**recs[r.name()], **used["recipe"], "settings": used["settings"],
                              "kd": kd, "ce": ce, "norm": r.norm_kind}
            if "range_rows" not in used["recipe"]:          # trained before the row term
                recs[r.name()]["range_rows"] = 0.0
    table["recipes"] = recs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "power_quality.json").write_text(json.dumps(table, indent=1))
    (out / "power_quality.md").write_text("# Power-Softmax quality\n\n" + markdown(table, recs))
    print((out / "power_quality.md").read_text())


if __name__ == "__main__":
    main()
