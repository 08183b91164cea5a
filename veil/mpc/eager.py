"""Cost per op category under SPU: the forward executed one `Ops` call at a time.

The fused step (spu_runtime.StepProgram) is one SPU program; SPU's profile can say how long its
`dot`s took but not whether a dot was the embedding, a projection, attention or the LM head. So
`EagerSpuOps` runs the same forward (veil/model/forward.py) with every Ops call compiled as its own
small SPU program over runtime variables (weights, activations and caches stay secret-shared in
the runtime between calls; positions are public). Each call's wall time, and its send bytes and
send actions from SPU's profile, are added to the call's category — MERGE's Table 1 columns:

    embedding   one-hot × table (and learned positions)
    linear      every projection and the LM head (the authors' timing code counts the head,
                with the softmax and argmax, in its "GenerateOther" bucket instead)
    attention   q·k, softmax, p·v, rope, cache writes — or MERGE's table mixing
    norm        RMS/Layer/affine norms
    activation  the MLP non-linearity and the gate product
    sampling    argmax and the next one-hot
    other       residual adds, slicing

Programs are cached by call site and shape, so every decode step after the first reuses them.
Costs are this party's: its clock, the bytes it sent and its send actions (≈ rounds in 2PC).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from veil.model.config import ModelConfig
from veil.model.forward import forward, hidden_states
from veil.model.generate import step_window
from veil.model.ops import Step
from veil.mpc.config import CLIENT
from veil.mpc.jax_ops import JaxCache
from veil.mpc.spu_runtime import Binder, spu_ops

HEAD_ARGMAX_ROWS = 64
CATEGORIES = ("embedding", "linear", "attention", "norm", "activation", "sampling", "other")
_OP_RE = re.compile(r"\] - (\S+), executed (\d+) times, duration ([\d.e+-]+)s, send bytes (\d+) "
                    r"recv bytes (\d+), send actions (\d+), recv actions (\d+)")
_RUN_RE = re.compile(r"\] HLO profiling: total time")


@dataclass
class Var:
    """A value living in the SPU runtime under `name` (secret unless `public`)."""

    name: str
    shape: tuple[int, ...]
    public: bool = False


@dataclass
class CategoryCost:
    seconds: float = 0.0
    send_bytes: int = 0
    send_actions: int = 0
    calls: int = 0


@dataclass
class CostLedger:
    """Per-category totals of one party."""

    by_category: dict[str, CategoryCost] = field(
        default_factory=lambda: {c: CategoryCost() for c in CATEGORIES})

    def add(self, category: str, seconds: float, send_bytes: int, send_actions: int) -> None:
        c = self.by_category[category]
        c.seconds += seconds
        c.send_bytes += send_bytes
        c.send_actions += send_actions
        c.calls += 1

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {k: {"seconds": v.seconds, "send_bytes": v.send_bytes,
                    "send_actions": v.send_actions, "calls": v.calls}
                for k, v in self.by_category.items()}


class ProfileTail:
    """Reads the runs SPU appended to its profile log since the last call (one process-wide log,
    set up by `libspu.logging.setup_logging`)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = Path(path), 0

    def take(self) -> tuple[int, int]:
        """(send bytes, send actions) of the HLO ops logged since the last call."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return 0, 0
        cut = text.rfind("\n") + 1            # only whole lines
        self.offset += len(text[:cut].encode("utf-8"))
        sent = actions = 0
        in_hlo = False
        for line in text[:cut].splitlines():
            if _RUN_RE.search(line):
                in_hlo = True
                continue
            m = _OP_RE.search(line)
            if m and in_hlo and m.group(1).startswith("pphlo."):
                sent += int(m.group(4))
                actions += int(m.group(6))
            elif "profiling: total time" in line:
                in_hlo = False                 # HAL / MPC sections repeat the same traffic
        return sent, actions


class EagerSpuOps:
    """The forward's Ops for one step, each call one SPU program (see the module docstring).
    Params live in the runtime as "p:<name>". Call sites are numbered from 1 per instance, so the
    steps that share `programs` (one instance each) reuse each other's compiled programs."""

    name = "spu-eager"

    def __init__(self, cfg: ModelConfig, runtime: Any, param_shapes: dict[str, tuple[int, ...]],
                 ledger: CostLedger, profile: ProfileTail | None, ops_cls: type, capacity: int,
                 programs: dict[tuple, tuple[Any, list[tuple[int, ...]]]]) -> None:
        self.cfg, self.rt, self.shapes, self.ledger = cfg, runtime, param_shapes, ledger
        self.profile, self.ops_cls, self.capacity = profile, ops_cls, capacity
        self.support = ops_cls.support
        self._programs = programs          # call-site key → (executable, output shapes)
        self._site = 0
        self.compile_s = 0.0
        self.head_softmax = False          # MpcConfig.head_softmax: softmax before the argmax

    # ---- the machinery -------------------------------------------------------------------
    def _call(self, category: str, fn: Callable[..., Any], inputs: list[Var],
              params: tuple[str, ...] = (), outputs: list[tuple[str | None, tuple[int, ...]]]
              | None = None) -> list[Var]:
        """Run `fn(params dict, *input arrays)` as one SPU program; returns its outputs as Vars
        (a None output name means a fresh per-call-site name)."""
        import spu.libspu as libspu
        import spu.utils.frontend as spu_fe

        self._site += 1
        out_specs = outputs or [(None, None)]
        names = [n or f"t{self._site}.{j}" for j, (n, _) in enumerate(out_specs)]
        in_names = [f"p:{p}" for p in params] + [v.name for v in inputs]
        key = (self._site, tuple(in_names), tuple(v.shape for v in inputs), tuple(names))
        f32 = jnp.float32
        if key not in self._programs:
            t0 = time.perf_counter()
            n_p = len(params)

            def flat(*arrays: Any) -> Any:
                out = fn(dict(zip(params, arrays[:n_p])), *arrays[n_p:])
                return out if isinstance(out, tuple) else (out,)

            specs = ([jax.ShapeDtypeStruct(self.shapes[p], f32) for p in params]
                     + [jax.ShapeDtypeStruct(v.shape, jnp.int32 if v.public else f32)
                        for v in inputs])
            secret, public = libspu.Visibility.VIS_SECRET, libspu.Visibility.VIS_PUBLIC
            vis = [secret] * n_p + [public if v.public else secret for v in inputs]
            exe, _ = spu_fe.compile(spu_fe.Kind.JAX, flat, tuple(specs), {}, in_names, vis,
                                    lambda outs: names)
            out_shapes = [tuple(o.shape) for o in jax.eval_shape(flat, *specs)]
            self._programs[key] = (exe, out_shapes)
            self.compile_s += time.perf_counter() - t0
        exe, out_shapes = self._programs[key]
        if self.profile is not None:
            self.profile.take()                       # drop whatever preceded this call
        t0 = time.perf_counter()
        self.rt.run(exe)
        seconds = time.perf_counter() - t0
        sent, actions = self.profile.take() if self.profile is not None else (0, 0)
        self.ledger.add(category, seconds, sent, actions)
        return [Var(n, s) for n, s in zip(names, out_shapes)]

    def _ops(self, params: dict[str, Any]) -> Any:
        return self.ops_cls(self.cfg, params)

    # ---- Ops -------------------------------------------------------------------------------
    def embed(self, x: Var) -> Var:
        return self._call("embedding", lambda p, x: self._ops(p).embed(x), [x],
                          ("embed.weight",))[0]

    def pos_embed(self, positions: Var) -> Var:
        return self._call("embedding", lambda p, pos: self._ops(p).pos_embed(pos), [positions],
                          ("pos_embed.weight",))[0]

    def norm(self, x: Var, name: str) -> Var:
        ps = tuple(k for k in (f"{name}.weight", f"{name}.bias") if k in self.shapes)
        return self._call("norm", lambda p, x: self._ops(p).norm(x, name), [x], ps)[0]

    def linear(self, x: Var, name: str) -> Var:
        ps = tuple(k for k in (f"{name}.weight", f"{name}.bias") if k in self.shapes)
        return self._call("linear", lambda p, x: self._ops(p).linear(x, name), [x], ps)[0]

    def linears(self, x: Var, names: tuple[str, ...]) -> tuple[Var, ...]:
        ps = tuple(k for n in names for k in (f"{n}.weight", f"{n}.bias") if k in self.shapes)
        outs = self._call("linear", lambda p, x: tuple(self._ops(p).linears(x, names)), [x], ps,
                          [(None, None)] * len(names))
        return tuple(outs)

    def rope(self, q: Var, k: Var, step: Step) -> tuple[Var, Var]:
        def fn(p: dict, q: Any, k: Any, pos: Any) -> tuple:
            return tuple(self._ops(p).rope(q, k, Step(pos, None, 0)))
        a, b = self._call("attention", fn, [q, k, step.positions], (), [(None, None)] * 2)
        return a, b

    def attention(self, layer: int, q: Var | None, k: Var | None, v: Var, step: Step,
                  cache: Any) -> Var:
        kc, vc = Var(f"k{layer}", self._cache_shape()), Var(f"v{layer}", self._cache_shape())
        constant = self.cfg.attention == "constant"
        ps = (f"layers.{layer}.attn.probs",) if constant else ()

        def fn(p: dict, *arrays: Any) -> tuple:
            if constant:
                v_, kc_, vc_, start, pos = arrays
                q_ = k_ = None
            else:
                q_, k_, v_, kc_, vc_, start, pos = arrays
            c = JaxCache([kc_] * (layer + 1), [vc_] * (layer + 1))
            out = self._ops(p).attention(layer, q_, k_, v_, Step(pos, None, start), c)
            return out, c.k[layer], c.v[layer]
        ins = ([v] if constant else [q, k, v]) + [kc, vc, step.start, step.positions]
        out, _, _ = self._call("attention", fn, ins, ps,
                               [(None, None), (f"k{layer}", None), (f"v{layer}", None)])
        return out

    def _cache_shape(self) -> tuple[int, ...]:
        cfg = self.cfg
        return (1, cfg.n_kv_heads, self.capacity, cfg.head_dim)

    def activation(self, x: Var) -> Var:
        return self._call("activation", lambda p, x: self._ops(p).activation(x), [x])[0]

    def mul(self, a: Var, b: Var) -> Var:
        return self._call("activation", lambda p, a, b: a * b, [a, b])[0]

    def add(self, a: Var, b: Var) -> Var:
        return self._call("other", lambda p, a, b: a + b, [a, b])[0]

    def last_position(self, x: Var) -> Var:
        return self._call("other", lambda p, x: x[:, -1:], [x])[0]

    def lm_head(self, x: Var) -> Var:
        name = "embed.weight" if self.cfg.tie_embeddings else "lm_head.weight"
        return self._call("linear", lambda p, x: self._ops(p).lm_head(x), [x], (name,))[0]

    def sample(self, logits: Var, next_name: str) -> tuple[Var, Var]:
        """Greedy token and its one-hot (the next input), inside MPC."""
        V = self.cfg.vocab_size

        def fn(p: dict, lg: Any) -> tuple:
            if self.head_softmax:
                lg = self._ops(p).softmax(lg, jnp.ones(lg.shape, dtype=bool))
            tok = jnp.argmax(lg, axis=-1)
            onehot = (jnp.arange(V) == tok[..., None]).astype(jnp.float32)
            return tok.astype(jnp.int32), onehot
        tok, nxt = self._call("sampling", fn, [logits], (), [(None, None), (next_name, None)])
        return tok, nxt


def measure_party(rank: int, lctx: Any, cfg: ModelConfig, mc: Any,
                  param_shapes: dict[str, tuple[int, ...]], params: dict[str, Any] | None,
                  prompt: list[int] | None, n_prompt: int, capacity: int, decode_steps: int,
                  log_path: Path | None) -> dict[str, Any]:
    """One party of a cost measurement: share the weights (owner) and the prompt (client), run the
    prompt step and `decode_steps` decode steps eagerly, and for embedding resending the LM head
    over `capacity − n_prompt` kept states. Returns this party's per-category costs per phase.

    Every decode step at a given capacity costs the same (attention spans the whole fixed-capacity
    cache under a public mask), so a generation's total is composed as prompt step +
    (generated − 1) × median decode step (+ the head)."""
    bind = Binder.open(rank, lctx, mc, profile=log_path is not None)
    rt = bind.rt
    share_s = bind.inputs(cfg, param_shapes, params, prompt, capacity, mc)

    resend = cfg.generation == "embedding_resend"
    profile = ProfileTail(log_path) if log_path is not None else None
    phases: dict[str, Any] = {}
    programs: dict[tuple, Any] = {}

    def new_ops(ledger: CostLedger) -> EagerSpuOps:
        ops = EagerSpuOps(cfg, rt, param_shapes, ledger, profile, spu_ops(mc), capacity, programs)
        ops.head_softmax = mc.head_softmax
        return ops

    def run_step(i: int) -> None:
        """Step `i` (0: the prompt) over the cache slots generation's step `i` covers."""
        start, t_new = step_window(n_prompt, i)
        first = i == 0
        ledger = CostLedger()
        ops = new_ops(ledger)
        bind.window(start, t_new)
        step = Step(Var("pos", (1, t_new), True), None, Var("start", (), True))
        t_step = time.perf_counter()
        if resend:
            x = Var("x", (1, t_new, cfg.vocab_size if first else cfg.d_model))
            h = hidden_states(cfg, ops, x if first else None, step, None,
                              embeds=None if first else x)
            h = ops._call("other", lambda p, h: h[:, -1:], [h], (), [("x", None)])[0]
        else:
            logits = forward(cfg, ops, Var("x", (1, t_new, cfg.vocab_size)), step, None,
                             last_only=True)
            ops.sample(logits, "x")
        wall = time.perf_counter() - t_step
        phases["prompt" if first else f"decode{i - 1}"] = {
            "wall_s": wall - ops.compile_s, "compile_s": ops.compile_s,
            "categories": ledger.snapshot()}

    for i in range(decode_steps + 1):
        run_step(i)
    if resend:
        n = capacity - n_prompt
        # the kept states' values do not change the head's cost: the client shares stand-ins
        bind.secret("hs", np.random.default_rng(0).standard_normal((1, n, cfg.d_model),
                                                                  dtype=np.float32) * 0.1
                    if rank == CLIENT else None, CLIENT)
        ledger = CostLedger()
        ops = new_ops(ledger)
        t_head = time.perf_counter()
        logits = ops.lm_head(Var("hs", (1, n, cfg.d_model)))
        # the argmax is row-wise: time it on up to HEAD_ARGMAX_ROWS rows and scale seconds and
        # bytes by n / rows (its rounds do not grow with rows) — an argmax over 508 × 50 257
        # secret logits would take this machine ~10 minutes per measurement
        rows = min(n, HEAD_ARGMAX_ROWS)
        part = ops._call("other", lambda p, lg: lg[:, :rows], [logits])[0]
        ops.sample(part, "tokens_onehot")
        sampled = ledger.by_category["sampling"]
        sampled.seconds *= n / rows
        sampled.send_bytes = int(sampled.send_bytes * n / rows)
        phases["head"] = {"wall_s": time.perf_counter() - t_head - ops.compile_s,
                          "compile_s": ops.compile_s, "argmax_rows_timed": rows,
                          "categories": ledger.snapshot()}
    return {"rank": rank, "share_weights_s": share_s, "phases": phases}
