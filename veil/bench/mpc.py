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
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from veil.bench import split_argv
from veil.errors import ConfigError, ProtocolAbort, VeilError
from veil.model import zoo
from veil.model.config import PRESETS, ModelConfig
from veil.mpc.config import NORM_RANGES, MpcConfig
from veil.mpc.cluster import (Cluster, PartyProcess, free_ports, read_json, run_local,
                              wait_parties)
from veil.mpc.netem import PROFILES, LinkProfile, Relay
from veil.variants.merge import merge, student_weights, variant_config

VARIANTS = ("vanilla", "only-er", "only-mm", "merge")
# "+logits": the same contender with MpcConfig(reveal="logits") — the client receives the logits
# and takes the argmax itself (MERGE's own ending; for vanilla, the client inputs its pick).
# "vanilla-paper": vanilla as MERGE's paper timed it — softmax over the whole vocabulary under MPC
# before the argmax, every step (MpcConfig.head_softmax); same tokens as vanilla.
FUSED_CONTENDERS = ("vanilla", "vanilla-paper", "only-er", "only-mm", "merge", "vanilla+logits",
                    "merge+logits")
MSLS = (64, 128, 256, 512)
PREFIX = 4


def split_contender(name: str) -> tuple[str, str]:
    """"merge+logits" → ("merge", "logits"); "merge" → ("merge", "tokens"); "vanilla-paper" →
    ("vanilla-paper", "tokens") (`variant_of` gives its model variant)."""
    variant, _, reveal = name.partition("+")
    if (variant not in (*VARIANTS, "vanilla-paper") or reveal not in ("", "logits")
            or (variant == "vanilla-paper" and reveal)):
        raise ConfigError(f"unknown contender {name!r} (known: {', '.join(VARIANTS)}, each "
                          "optionally with +logits, and vanilla-paper)")
    return variant, reveal or "tokens"


def variant_of(contender: str) -> str:
    """The model variant a contender runs ("vanilla-paper" runs vanilla's model)."""
    variant = split_contender(contender)[0]
    return "vanilla" if variant == "vanilla-paper" else variant


GPT2_BASE = ModelConfig(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                        n_kv_heads=12, d_ff=3072, max_seq_len=1024, norm="layer", norm_eps=1e-5,
                        activation="gelu_tanh", mlp="plain", position="learned", qkv_bias=True,
                        o_bias=True, mlp_bias=True, tie_embeddings=True, bos_token_id=50256,
                        eos_token_ids=(50256,), name="gpt2-base-shapes")


def model_for(variant: str, msl: int, base_name: str = "gpt2-base", seed: int = 0):
    """(config, owner's MPC params) of a contender: random weights, converted like a student.
    `base_name`: gpt2-base (the benchmark's shapes) or a tiny preset (the suite's test)."""
    cfg, params, _ = build(variant, msl, base_name, seed)
    return cfg, params


def build(variant: str, msl: int, base_name: str = "gpt2-base", seed: int = 0):
    """`model_for`'s (config, params) and the norm form and shift the model's calibration asks
    for (veil/mpc/calibration.py: plain for GPT-2 shapes, whose norm inputs stay small)."""
    from veil.mpc.calibration import needs_norm_form
    from veil.mpc.program import params_of      # jax: only the party processes load it

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
    return cfg, params_of(cfg, w), needs_norm_form(cfg, w)


@dataclass(frozen=True)
class PartySpec:
    """What one bench party runs. The launcher writes it as JSON and the party reads it back
    (`python -m veil.bench.mpc party SPEC.json`); both sides construct it, so both validate."""

    rank: int                   # 0 the owner, 1 the client
    contender: str              # a VARIANTS name, with "+logits" for reveal="logits" (fused only)
    msl: int                    # max sequence length: the cache's capacity
    parties: tuple[str, ...]    # "host:port" of rank 0 and rank 1
    decode_steps: int           # decode steps measured after the prompt step
    out: str                    # where the party writes its result (JSON)
    log: str                    # SPU's log: its profile gives send bytes and actions per op
    base: str                   # "gpt2-base" (the benchmark's shapes) or a tiny preset
    weight_cache: bool          # SPU's Beaver cache for the weights (MpcConfig.weight_cache)
    mode: str                   # "eager" (one program per Ops call) or "fused" (generation's)
    profile: bool = True        # SPU's profile on (bytes, rounds); off for the timed runs
    trunc_msb: bool = False     # SPU's trunc_allow_msb_error (MpcConfig.trunc_msb)
    norm_range: str = "auto"    # MpcConfig.norm_range; "auto": the model's calibration

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"bench mpc party spec: {name}: {why}")

        def integer(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not integer(self.rank) or self.rank not in (0, 1):
            raise bad("rank", f"must be 0 (owner) or 1 (client), got {self.rank!r}")
        if self.mode not in ("eager", "fused"):
            raise bad("mode", f"must be 'eager' or 'fused', got {self.mode!r}")
        if not isinstance(self.contender, str):
            raise bad("contender", f"must be a string, got {self.contender!r}")
        try:
            reveal = split_contender(self.contender)[1]
        except ConfigError as exc:
            raise bad("contender", str(exc)) from None
        if reveal != "tokens" and self.mode != "fused":
            raise bad("contender", f"{self.contender!r}: '+logits' contenders are timed with the "
                                   "fused programs only")
        if not integer(self.decode_steps) or self.decode_steps < 1:
            raise bad("decode_steps", f"must be a positive integer, got {self.decode_steps!r}")
        least = PREFIX + self.decode_steps + 1
        if not integer(self.msl) or self.msl < least:
            raise bad("msl", f"must be an integer of at least {least} (the {PREFIX}-token prompt, "
                             f"{self.decode_steps} decode steps and one more), got {self.msl!r}")
        if isinstance(self.parties, list):          # as JSON gives it
            object.__setattr__(self, "parties", tuple(self.parties))
        if not isinstance(self.parties, tuple):
            raise bad("parties", f"must be a list of 'host:port' addresses, got {self.parties!r}")
        try:
            self.cluster()
        except ConfigError as exc:
            raise bad("parties", str(exc)) from None
        for name in ("out", "log"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, f"must be a file path, got {getattr(self, name)!r}")
        if not isinstance(self.base, str) or (self.base != "gpt2-base" and self.base not in PRESETS):
            raise bad("base", f"must be 'gpt2-base' or a preset ({', '.join(PRESETS)}), "
                              f"got {self.base!r}")
        for name in ("weight_cache", "profile", "trunc_msb"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.norm_range not in NORM_RANGES:
            raise bad("norm_range", f"must be one of {list(NORM_RANGES)}, got {self.norm_range!r}")

    def cluster(self) -> Cluster:
        return Cluster.from_dict({"protocol": "semi2k", "timeout_s": 600,
                                  "parties": list(self.parties)})

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @staticmethod
    def load(path: str | Path) -> "PartySpec":
        path = Path(path)
        raw = read_json(path, "the party spec")
        names = [f.name for f in fields(PartySpec)]
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        unknown, missing = sorted(set(raw) - set(names)), [n for n in names if n not in raw]
        if unknown or missing:
            raise ConfigError(f"{path}: bench mpc party spec: unknown fields {unknown}, "
                              f"missing fields {missing}")
        try:
            return PartySpec(**raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _party_main(spec: PartySpec) -> None:
    """One bench party: build the contender, link up, measure, write the result to `spec.out`."""
    # SPU and jax load only in the party processes, not in the launcher
    import numpy as np
    import spu.libspu as libspu

    from veil.mpc.eager import measure_party
    from veil.mpc.fused_timing import measure_fused_party
    from veil.mpc.spu_runtime import scratch_dir

    lo = libspu.logging.LogOptions()
    lo.enable_console_logger = False
    lo.system_log_path = spec.log
    libspu.logging.setup_logging(lo)
    variant, reveal = split_contender(spec.contender)
    t0 = time.perf_counter()
    cfg, params, norm_form = build(variant_of(spec.contender), spec.msl, spec.base)
    # both parties build the same public test weights, so both calibrate alike
    form, shift = norm_form if spec.norm_range == "auto" else (spec.norm_range, 0)
    mc = MpcConfig(profile=spec.profile, weight_cache=spec.weight_cache, reveal=reveal,
                   head_softmax=variant == "vanilla-paper", trunc_msb=spec.trunc_msb,
                   norm_range=form, norm_shift=shift)
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    if spec.rank != 0:
        params = None
    build_s = time.perf_counter() - t0
    lctx = libspu.link.create_brpc(spec.cluster().link_desc(), spec.rank)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, cfg.vocab_size, PREFIX)]
    how = measure_fused_party if spec.mode == "fused" else measure_party
    with scratch_dir():
        res = how(spec.rank, lctx, cfg, mc, shapes, params, prompt if spec.rank == 1 else None,
                  PREFIX, spec.msl, spec.decode_steps, Path(spec.log) if spec.profile else None)
    res["build_s"] = build_s
    res["norm_range"] = f"{mc.norm_range} (×2^{mc.norm_shift})" if mc.norm_shift else mc.norm_range
    # let the link deliver this party's last messages before the process goes: exiting at once
    # can drop an async send the peer's final step still waits for
    lctx.stop_link()
    Path(spec.out).write_text(json.dumps(res))


def measure(variant: str, msl: int, decode_steps: int = 3, timeout_s: float = 3000.0,
            base: str = "gpt2-base", weight_cache: bool = True, fused: bool = False,
            pick_ports: Callable[[int], list[int]] = free_ports, profile: bool = True,
            trunc_msb: bool = False, norm_range: str = "auto",
            link: LinkProfile | None = None) -> list[dict[str, Any]]:
    """Both parties' results for one contender (two processes over TCP on loopback): per-Ops
    programs and costs by category, or with `fused` the step programs generation runs.
    `profile`: SPU's profile on (bytes and rounds; off, only wall times are meaningful);
    `link`: the parties reach each other through a relay with that delay and rate
    (veil/mpc/netem.py). `pick_ports` chooses the ports (cluster.run_local). A failed run keeps
    its folder: the error names the parties' logs in it."""
    folder = Path(tempfile.mkdtemp(prefix="veil-bench-mpc-"))
    relays: list[Relay] = []

    def spec(rank: int, addresses: tuple[str, ...]) -> PartySpec:
        return PartySpec(rank=rank, contender=variant, msl=msl, parties=addresses,
                         decode_steps=decode_steps, out=str(folder / f"party{rank}.json"),
                         log=str(folder / f"party{rank}.spu.log"), base=base,
                         weight_cache=weight_cache, mode="fused" if fused else "eager",
                         profile=profile, trunc_msb=trunc_msb, norm_range=norm_range)

    def view(rank: int, addresses: tuple[str, ...]) -> tuple[str, ...]:
        """The addresses party `rank` uses: its own to listen on, the relay's for its peer."""
        if link is None:
            return addresses
        return tuple(a if r == rank else relays[-1].addresses[r] for r, a in enumerate(addresses))

    def commands(addresses: tuple[str, ...]) -> list[list[str]]:
        if link is not None:
            relays.append(Relay(link, list(addresses)))
        specs = [spec(rank, view(rank, addresses)) for rank in (0, 1)]   # both valid first
        for s in specs:
            s.write(folder / f"party{s.rank}.spec.json")
        return [[sys.executable, "-m", "veil.bench.mpc", "party",
                 str(folder / f"party{s.rank}.spec.json")] for s in specs]

    def supervise(parties: list[PartyProcess]) -> list[dict[str, Any]]:
        wait_parties(parties, time.monotonic() + timeout_s, f"the parties ({timeout_s:.0f} s)")
        outs = [folder / f"party{rank}.json" for rank in (0, 1)]
        if not all(o.is_file() for o in outs):
            raise ProtocolAbort(f"a party exited without writing its result (logs in {folder})")
        return [json.loads(o.read_text()) for o in outs]

    keep = False
    try:
        return run_local(folder, 2, commands, supervise, pick_ports)
    except ProtocolAbort as exc:
        keep = True                    # with the parties' logs the error names
        raise ProtocolAbort(f"bench mpc: {variant} at MSL {msl} failed: {exc}") from None
    finally:
        for r in relays:
            r.close()
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def cfg_vocab(base: str) -> int:
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
    out["norm_range"] = parties[1].get("norm_range")
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


def compose_fused(parties: list[dict[str, Any]], msl: int, sample: int | None = None
                  ) -> dict[str, Any]:
    """A whole generation from the fused programs' phases: prompt step + first decode step +
    (MSL − 6) × median later decode step (+ the head over MSL − 4 rows, composed from its two
    runs on `head_rows` rows). Time is the client's clock; bytes both parties' sends (and the
    busier party's alone, for a link's rate); rounds the larger send-action count. `sample`: use
    only the first `sample` decode steps (to check the composition against a run that measured
    every step: then `full_s` is that run's own sum)."""
    n_gen = msl - PREFIX
    decodes = [k for k in parties[0]["phases"] if k.startswith("decode")]
    every = decodes
    if sample is not None:
        decodes = decodes[:sample]
    first, later = (decodes[0], decodes[1:]) if len(decodes) > 1 else (decodes[0], decodes)

    def head(p: dict, key: str) -> float:
        ph = p["phases"]
        if "head_first" not in ph:
            return 0.0
        return ph["head_first"][key] + (n_gen / p["head_rows"] - 1) * ph["head_again"][key]

    def total(p: dict, key: str) -> float:
        ph = p["phases"]
        return (ph["prompt"][key] + ph[first][key]
                + (n_gen - 2) * statistics.median(ph[d][key] for d in later) + head(p, key))

    client = parties[1]["phases"]
    out = {"total_s": total(parties[1], "wall_s"),
           "total_bytes": sum(total(p, "send_bytes") for p in parties),
           "busier_bytes": max(total(p, "send_bytes") for p in parties),
           "total_rounds": max(total(p, "send_actions") for p in parties),
           "measured": {"prompt_step_s": client["prompt"]["wall_s"],
                        "first_decode_step_s": client[first]["wall_s"],
                        "decode_step_s": statistics.median(client[d]["wall_s"] for d in later),
                        "head_s": head(parties[1], "wall_s"), "compile_s": parties[1]["compile_s"],
                        "share_weights_s": parties[1]["share_weights_s"]},
           "norm_range": parties[1].get("norm_range")}
    if len(every) == n_gen - 1:          # every step of the generation was run
        out["full_s"] = (client["prompt"]["wall_s"] + sum(client[d]["wall_s"] for d in every)
                         + head(parties[1], "wall_s"))
    return out


_UNITS = ("Seconds are the client's clock; GB are both parties' sends; rounds = send actions of "
          "the busier party.")


def _render(rows: list[dict[str, Any]], meta: dict[str, Any], title: str, intro: list[str],
            columns: tuple[list[str], list[str]],
            cells: Callable[[dict[str, Any]], tuple[list[str], list[str]]],
            goals_note: str = "") -> str:
    """The frame both tables share: title with the set-up, intro paragraphs, one row per
    (MSL, contender) — `cells` gives the row's own columns before and after the shared total /
    speed-up / GB / % of vanilla comm / rounds — the dates rows were measured on where they
    differ, and the paper's goals."""
    cache = ("weights' masks opened once (Beaver cache)" if meta.get("weight_cache")
             else "every product re-opens its weight's mask (no Beaver cache)")
    head = ["MSL", "contender", *columns[0], "total s", "speed-up", "GB", "% of vanilla comm",
            "rounds", *columns[1]]
    lines = [f"# {title} on {meta['base']} ({meta['when']}, {meta['machine']}, SEMI2K FM64/18, "
             f"2 parties as processes over TCP loopback; {cache})", ""]
    for paragraph in intro:
        lines += [paragraph, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r["msl"]: r for r in rows if r["contender"] == "vanilla"}
    for r in rows:
        v = base.get(r["msl"])
        speed = v["total_s"] / r["total_s"] if v else float("nan")
        comm = 100 * r["total_bytes"] / v["total_bytes"] if v else float("nan")
        before, after = cells(r)
        shared = [f"{r['total_s']:.1f}", f"{speed:.2f}×", f"{r['total_bytes'] / 1e9:.2f}",
                  f"{comm:.1f}%", f"{int(r['total_rounds'])}"]
        lines.append("| " + " | ".join([str(r["msl"]), r["contender"], *before, *shared, *after])
                     + " |")
    dates = sorted({r["when"] for r in rows if "when" in r})
    if len(dates) > 1:
        which = {d: sorted(f"{r['contender']} @ {r['msl']}" for r in rows if r.get("when") == d)
                 for d in dates}
        lines += ["", "Rows measured on: " + "; ".join(f"{d}: {', '.join(w)}"
                                                      for d, w in which.items()) + "."]
    lines += ["", "Goals (MERGE's paper, CrypTen on V100s): ≥ 26.5× at MSL 512, ≥ 7.75× at 128, "
              "communication ≤ 20% of vanilla at 512." + goals_note, ""]
    return "\n".join(lines)


LEVERS = ("", "trunc-msb", "reduced-norm")
NETWORKS = ("loopback", "lan", "wan")


def _key(r: dict[str, Any]) -> tuple:
    return (r["msl"], r["contender"], r.get("network", "loopback"), r.get("lever", ""))


def markdown_fused(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """mpc_fused.md: per network, every contender's generation time (median and range over the
    timed runs), speed-ups against vanilla and vanilla-paper, traffic, the steps it was composed
    from, projections onto the other networks; then SPU's levers and the composition check."""
    cache = ("weights' masks opened once (Beaver cache)" if meta.get("weight_cache")
             else "every product re-opens its weight's mask (no Beaver cache)")
    lines = [f"# MPC, fused step programs: vanilla vs MERGE on {meta['base']} ({meta['when']}, "
             f"{meta['machine']}, SEMI2K FM64/18, 2 parties as processes; {cache})", "",
             "The programs `veil generate --scheme mpc|merge` runs (one SPU program per step). "
             "Each generation (prefix 4, greedy, batch 1) is composed: prompt step + first decode "
             "step + (MSL − 6) × median later decode step (+ MERGE's LM head over MSL − 4 rows: "
             "its 64-row program's first run + (rows / 64 − 1) × its second); the check at the end "
             "compares that with a run that measured every step.", "",
             "Timed with SPU's profiling **off**; each row's time is the median (and min–max) of "
             "its timed runs, each two fresh party processes. Bytes and rounds come from a "
             "separate profiled run on loopback (they do not depend on the network). Seconds are "
             "the client's clock; GB both parties' sends; rounds the busier party's send actions. "
             "**Bold** speed-ups come from runs alternated with vanilla's (vanilla, then the "
             "contender, round after round; median and range of the rounds' ratios): this "
             "machine's speed moves several-fold between hours, so only those compare like with "
             "like. The others divide rows timed at different hours; `host probe ms` (a fixed CPU "
             "workload timed before each run, median; lower is faster) shows how far apart. "
             "Norms take the form the model's public calibration asks for "
             "(veil/mpc/calibration.py): `plain` (one rsqrt) for these GPT-2 shapes.", "",
             "Contenders: `vanilla` — one-hot × table embedding, real softmax attention with a KV "
             "cache, GeLU, LayerNorm, LM head and argmax under MPC every step, the argmax's "
             "one-hot the next input (tokens only reach the client); `vanilla-paper` — the same "
             "plus a softmax over the whole vocabulary before the argmax, as the MERGE authors' "
             "baseline computes it (same tokens); `merge` — the MERGE model (resent states, "
             "constant attention, quad activations, merged affine norms), the LM head and argmax "
             "once at the end; `+logits` — the client receives the logits and takes the argmax "
             "itself (MERGE's own ending; it learns the logit vectors, not only the tokens).", ""]
    main = [r for r in rows if r.get("lever", "") == ""]
    for net in NETWORKS:
        here = [r for r in main if r.get("network", "loopback") == net]
        if not here:
            continue
        link = PROFILES.get(net)
        lines += [f"## {link.describe() if link else 'loopback (no added delay, no rate limit)'}",
                  ""]
        head = ["MSL", "contender", "total s", "min–max", "runs", "vs vanilla", "vs vanilla-paper",
                "GB", "% of vanilla comm", "rounds", "prompt step s", "later decode step s",
                "head s", "host probe ms", "measured"]
        head += (["projected LAN s", "projected WAN s"] if net == "loopback"
                 else ["projected from loopback s", "measured / projected"])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in here:
            ref = {c: next((x for x in here if x["msl"] == r["msl"] and x["contender"] == c), None)
                   for c in ("vanilla", "vanilla-paper")}
            vs = [f"{ref[c]['total_s'] / r['total_s']:.2f}×" if ref[c] else "–"
                  for c in ("vanilla", "vanilla-paper")]
            paired = r.get("paired_vs_vanilla")
            if paired:       # from runs alternated with vanilla's: median (min–max) of the rounds
                vs[0] = f"**{paired['median']:.2f}×** ({paired['min']:.2f}–{paired['max']:.2f})"
            v = ref["vanilla"]
            comm = f"{100 * r['total_bytes'] / v['total_bytes']:.1f}%" if v else "–"
            m = r["measured"]
            lo, hi = r.get("min", r["total_s"]), r.get("max", r["total_s"])
            cells = [str(r["msl"]), r["contender"], f"{r['total_s']:.1f}",
                     f"{lo:.1f}–{hi:.1f}", str(r.get("repeats", 1)), *vs,
                     f"{r['total_bytes'] / 1e9:.2f}", comm, f"{int(r['total_rounds'])}",
                     f"{m['prompt_step_s']:.2f}", f"{m['decode_step_s']:.2f}", f"{m['head_s']:.1f}",
                     f"{r['probe_ms']:.0f}" if "probe_ms" in r else "–", r.get("when", "–")]
            if net == "loopback":
                proj = r.get("projection")
                cells += [f"{proj[n]:.0f}" if proj else "–" for n in ("lan", "wan")]
            else:
                proj = r.get("projected_s")
                cells += [f"{proj:.0f}" if proj else "–",
                          f"{r['total_s'] / proj:.2f}" if proj else "–"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    levers = [r for r in rows if r.get("lever", "") in ("trunc-msb", "reduced-norm")]
    if levers:
        lines += ["## SPU levers and the norm form (loopback)", "",
                  "`trunc-msb`: SPU's `trunc_allow_msb_error` (truncation done locally, as CrypTen "
                  "does). `reduced-norm`: the four-regime range-reduced norm veil needs for "
                  "SmolLM2's massive activations, forced on these GPT-2 shapes (what every "
                  "contender paid before the calibration chose the form).", "",
                  "| MSL | contender | lever | total s | min–max | vs same contender without | "
                  "rounds | GB |", "|---|---|---|---|---|---|---|---|"]
        for r in levers:
            base = next((x for x in main if _key(x)[:3] == _key(r)[:3]), None)
            vs = f"{base['total_s'] / r['total_s']:.2f}×" if base else "–"
            lines.append(f"| {r['msl']} | {r['contender']} | {r['lever']} | {r['total_s']:.1f} | "
                         f"{r['min']:.1f}–{r['max']:.1f} | {vs} | {int(r['total_rounds'])} | "
                         f"{r['total_bytes'] / 1e9:.2f} |")
        lines.append("")
    full = [r for r in rows if r.get("lever") == "full"]
    if full:
        lines += ["## Composition check: every step measured once", "",
                  "| MSL | contender | sum of every step s | composed from 3 decode steps s | "
                  "difference |", "|---|---|---|---|---|"]
        for r in full:
            lines.append(f"| {r['msl']} | {r['contender']} | {r['full_s']:.1f} | "
                         f"{r['total_s']:.1f} | {100 * (r['total_s'] / r['full_s'] - 1):+.1f}% |")
        lines.append("")
    dates = sorted({r["when"] for r in rows if "when" in r})
    if len(dates) > 1:
        lines += ["Rows measured on: " + ", ".join(dates) + ".", ""]
    lines += ["Goals (MERGE's paper, CrypTen on V100s): ≥ 26.5× at MSL 512, ≥ 7.75× at 128, "
              "communication ≤ 20% of vanilla at 512. Per-category costs: mpc.md (eager, "
              "profiled).", ""]
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    steps = ("first decode step + (MSL − 6) × median later decode step"
             if rows and rows[0]["measured"].get("first_decode_step_s") is not None
             else "(MSL − 5) × median measured decode step")
    intro = [f"Composed per generation (prefix 4, greedy, batch 1): prompt step + {steps} "
             "(+ MERGE's LM head once). " + _UNITS]
    stale = sorted({f"{r['contender']} @ {r['msl']}" for r in rows if not r.get("norm_range")})
    if stale:
        # rows from before the per-model norm calibration (veil/mpc/calibration.py) ran every
        # contender's norms in the range-reduced form, with SPU's profiling on while timed
        which = ("every row" if len(stale) == len({(r["contender"], r["msl"]) for r in rows})
                 else ", ".join(stale))
        intro.append("**Measured before the per-model norm calibration** (" + which
                     + "): every norm in the four-regime range-reduced form and SPU's profiling "
                     "on while timed, which inflates the norm column and the contenders with "
                     "norms (vanilla, only-ER) — at MSL 128 the reduced form alone costs vanilla "
                     "1.24× (benchmarks/results/mpc_fused.md, which has the current method and "
                     "the figures to quote). Read these rows for the categories' proportions "
                     "between MERGE's parts, not for the speed-ups.")
    cats = ("embedding", "linear", "attention", "norm", "activation", "sampling")

    def cells(r: dict[str, Any]) -> tuple[list[str], list[str]]:
        return ([f"{r['categories'][k]['seconds']:.1f}" for k in cats],
                [f"{r['measured']['decode_step_s']:.2f}", f"{r['measured']['prompt_step_s']:.2f}"])
    return _render([x for r in rows for x in (r, *_logits_to_client(r))], meta,
                   "MPC: vanilla vs MERGE", intro,
                   ([f"{k} s" for k in cats], ["measured decode step s", "measured prompt step s"]),
                   cells)


def host_probe_ms() -> float:
    """A fixed CPU workload's time (ms, median of 3; SHA-256 over 4 MiB and a Python loop): this
    machine's speed moves several-fold between hours, so every timed run records it — rows timed
    in different hours can then be told apart, and ratios are taken between runs measured side by
    side (alternated), not between rows."""
    import hashlib

    data = bytes(4 << 20)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        hashlib.sha256(data).digest()
        sum(i * i for i in range(200_000))
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _fused_kw(base: str, weight_cache: bool, lever: str) -> dict[str, Any]:
    return dict(base=base, weight_cache=weight_cache, fused=True, trunc_msb=lever == "trunc-msb",
                norm_range="reduced" if lever == "reduced-norm" else "auto")


def _fused_rows(contenders: list[str], msl: int, network: str, lever: str, repeats: int,
                decode_steps: int, base: str, weight_cache: bool,
                counts: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The rows of mpc_fused for `contenders` at one MSL: each contender's bytes and rounds from
    `counts[c]` (a profiled loopback run's composition; made here when None), then `repeats`
    rounds of timed runs (profiling off) over `network`, the contenders alternated within each
    round so that the speed-ups between them come from runs made side by side (`paired`: each
    contender's time over vanilla's in the same round, median and range)."""
    kw = _fused_kw(base, weight_cache, lever)
    if lever == "full":                  # every step once: the composition check
        rows = []
        for c in contenders:
            parties = measure(c, msl, msl - PREFIX - 1, profile=False, **kw)
            comp = compose_fused(parties, msl, sample=decode_steps)
            rows.append({"msl": msl, "contender": c, "network": network, "lever": lever,
                         "repeats": 1, "min": comp["total_s"], "max": comp["total_s"], **comp})
        return rows
    counts = {c: counts.get(c) or compose_fused(measure(c, msl, decode_steps, profile=True, **kw),
                                                 msl) for c in contenders}
    link = PROFILES.get(network)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
    for _ in range(repeats):
        for c in contenders:
            probe = host_probe_ms()
            r = compose_fused(measure(c, msl, decode_steps, profile=False, link=link, **kw), msl)
            runs[c].append({**r, "probe_ms": probe})
    rows = []
    for c in contenders:
        ordered = sorted(runs[c], key=lambda r: r["total_s"])
        med = ordered[len(ordered) // 2]
        row = {"msl": msl, "contender": c, "network": network, "lever": lever,
               "repeats": len(ordered), "total_s": statistics.median(r["total_s"] for r in ordered),
               "min": ordered[0]["total_s"], "max": ordered[-1]["total_s"],
               "total_s_runs": [r["total_s"] for r in runs[c]],
               "probe_ms_runs": [r["probe_ms"] for r in runs[c]],
               "probe_ms": statistics.median(r["probe_ms"] for r in runs[c]),
               "measured": med["measured"], "norm_range": med["norm_range"],
               "counts_from": "profiled loopback run", "alternated_with": contenders}
        if "vanilla" in runs and c != "vanilla":
            ratios = sorted(v["total_s"] / x["total_s"] for v, x in zip(runs["vanilla"], runs[c]))
            row["paired_vs_vanilla"] = {"median": statistics.median(ratios), "min": ratios[0],
                                        "max": ratios[-1]}
        for k in ("total_bytes", "busier_bytes", "total_rounds"):
            row[k] = counts[c][k]
        rows.append(row)
    return rows


def _project(rows: list[dict[str, Any]]) -> None:
    """Loopback rows: their time projected onto each network profile; network rows: the
    projection of their loopback twin, for the measured / projected column."""
    loop = {_key(r)[:2] + (r.get("lever", ""),): r for r in rows
            if r.get("network", "loopback") == "loopback" and "busier_bytes" in r}
    for r in rows:
        if "busier_bytes" not in r:
            continue
        if r.get("network", "loopback") == "loopback":
            r["projection"] = {n: PROFILES[n].project(r["total_s"], r["total_rounds"],
                                                      r["busier_bytes"]) for n in PROFILES}
        else:
            twin = loop.get(_key(r)[:2] + (r.get("lever", ""),))
            r["projected_s"] = (PROFILES[r["network"]].project(
                twin["total_s"], twin["total_rounds"], twin["busier_bytes"]) if twin else None)


def run(msls: tuple[int, ...] = MSLS, variants: tuple[str, ...] | None = None,
        decode_steps: int = 3, out_dir: str | Path = "benchmarks/results",
        base: str = "gpt2-base", weight_cache: bool = True, fused: bool = False,
        update: bool = False, repeats: int = 3, network: str = "loopback",
        lever: str = "") -> list[Path]:
    """Writes mpc.json / mpc.md (mpc_fused.* with `fused`; a `_nocache` suffix without the
    Beaver weight cache). With `update`, rows already in the JSON for other (MSL, contender,
    network, lever) keys are kept (each row carries the date it was measured), and the measured
    ones replace theirs. Fused rows: `repeats` timed runs over `network` ("loopback", "lan",
    "wan": veil/mpc/netem.py's relay) with `lever` ("", "trunc-msb", "reduced-norm", or "full":
    one run measuring every step, the composition check)."""
    variants = variants or (FUSED_CONTENDERS if fused else VARIANTS)
    if network not in NETWORKS or lever not in (*LEVERS, "full"):
        raise ConfigError(f"network must be one of {NETWORKS} and lever one of "
                          f"{(*LEVERS, 'full')}")
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
    def keep(new: list[dict[str, Any]]) -> None:
        nonlocal rows
        for row in new:
            row.update(vocab=cfg_vocab(base), when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
            rows = [r for r in rows if _key(r) != _key(row)]
            rows.append(row)
        rows.sort(key=lambda r: (NETWORKS.index(r.get("network", "loopback")),
                                 r.get("lever", ""), r["msl"], order.get(r["contender"], 99)))
        if fused:
            _project(rows)
        # written after every MSL (eager: every contender): a long sweep keeps what it measured
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / f"{stem}.md").write_text(render(rows, meta))

    for msl in msls:
        if fused:
            twins = {v: next((r for r in rows if _key(r) == (msl, v, "loopback", lever)
                              and "busier_bytes" in r), None) if network != "loopback" else None
                     for v in variants}
            keep(_fused_rows(list(variants), msl, network, lever, repeats, decode_steps, base,
                             weight_cache, twins))
            continue
        for variant in variants:
            parties = measure(variant, msl, decode_steps, base=base, weight_cache=weight_cache)
            keep([{"msl": msl, "contender": variant, **compose(parties, msl), "raw": parties}])
    return [out / f"{stem}.json", out / f"{stem}.md"]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "party":
        if len(sys.argv) != 3:
            sys.exit("usage: python -m veil.bench.mpc party SPEC.json")
        try:
            _party_main(PartySpec.load(sys.argv[2]))
        except VeilError as exc:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            os._exit(2)
        os._exit(0)       # SPU's link threads must not keep the process alive
    elif len(sys.argv) > 1 and sys.argv[1] == "table":       # re-render mpc.md from mpc.json
        data = json.loads(Path(sys.argv[2]).read_text())
        render = markdown_fused if data["meta"].get("programs") == "fused" else markdown
        Path(sys.argv[2]).with_suffix(".md").write_text(render(data["rows"], data["meta"]))
    else:
        # python -m veil.bench.mpc [MSLS [CONTENDERS]] [--fused] [--update] [--no-weight-cache]
        #                          [--repeats=N] [--network=lan|wan] [--lever=trunc-msb|...]
        args, opts = split_argv(sys.argv[1:])
        msls = tuple(int(x) for x in args[0].split(",")) if args else MSLS
        variants = tuple(args[1].split(",")) if len(args) > 1 else None
        for p in run(msls, variants, weight_cache="--no-weight-cache" not in sys.argv,
                     fused="--fused" in sys.argv, update="--update" in sys.argv,
                     repeats=int(opts.get("repeats", 3)), network=opts.get("network", "loopback"),
                     lever=opts.get("lever", "")):
            print(f"wrote {p}")
