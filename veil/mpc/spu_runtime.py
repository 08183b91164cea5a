"""Private generation on SecretFlow SPU: the compiled step, and the party loop that runs it.

Parties: rank 0 is the model owner (supplies the weights), rank 1 the client (supplies its
tokens, and is the only one to learn the generated ones); ABY3 adds a third computing party.
Every party compiles the step itself from the public model config (a party never runs a program
a peer sent it), secret-shares its own input, and sends each peer that peer's share over the
link. Between steps the KV cache and the next token's one-hot never leave the runtime: each
step's outputs are re-bound as the next step's inputs, still shared. After each step the owner
(and the helper party) send the client their shares of the token id — the only value revealed.

The same `party` function runs in threads over SPU's in-memory link (the simulator, for tests)
and in one OS process per party over TCP (veil/mpc/cluster.py).
"""

from __future__ import annotations

import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from veil.errors import ProtocolAbort
from veil.model.config import ModelConfig
from veil.model.generate import step_window
from veil.mpc.jax_ops import JaxOps
from veil.mpc.program import make_head, make_resend_step, make_step, one_hot

from veil.mpc.config import CLIENT, OWNER, MpcConfig


class SpuOps(JaxOps):
    """JaxOps with MPC-safe forms: SPU's exp is a Taylor approximation that turns to garbage far
    below zero (exp(−1000) ≈ 3e7), so masked scores are a moderate −64 (and then zeroed by the
    public mask) and the shifted scores are clamped at −32 before the exponential (exp(−32) ≈
    1e−14, far below the fixed-point step)."""

    name = "spu"
    mask_fill = -64.0
    # Norms see "massive activations" (SmolLM2: residual entries ~22 000, mean square ~9e5 from
    # layer 11 on). In FM64 with 18 fractional bits a square wraps the ring above |x| ≈ 11 600,
    # SPU's rsqrt returns 0 for inputs ≥ 2^18, and a small 1/rms (1e-3) keeps only ~3 significant
    # bits. So the mean square is taken of x and of x·2^−3 (valid to |x| ≈ 60 000); the scaled
    # one picks, by public thresholds, a regime in which rsqrt's input is range-reduced by a
    # public power of 4 to where its result is ~0.1–4, and x is multiplied by that before the
    # public power of 2 is applied. Regime edges are soft: both neighbours are valid there.
    norm_shift = 3

    def normalize(self, xc: Any) -> Any:
        s, eps = self.norm_shift, self.cfg.norm_eps
        rs = jax.lax.rsqrt
        m0 = jnp.mean(xc * xc, axis=-1, keepdims=True) + eps      # wraps if some |x| > 11 600
        xs = xc * (2.0 ** -s)
        m1 = jnp.mean(xs * xs, axis=-1, keepdims=True) + eps * 4.0 ** -s   # = m0 / 64, no wrap
        xu = xc * 16.0                                               # m0 < 16 ⇒ every |x| < 96
        small = xu * rs(jnp.mean(xu * xu, axis=-1, keepdims=True) + eps * 256.0)
        mid = (xc * rs(m0 * 2.0 ** -8)) * 2.0 ** -4                  # m0 in [16, 4096)
        large = (xs * rs(m1 * 2.0 ** -8)) * 2.0 ** -4                # m0 in [4096, 2^20)
        huge = (xs * rs(m1 * 2.0 ** -16)) * 2.0 ** -8                # m0 ≥ 2^20 (m1 < 2^34)
        return jnp.where(m1 < 0.25, small,
                         jnp.where(m1 < 64.0, mid, jnp.where(m1 < 2.0 ** 14, large, huge)))

    def softmax(self, scores: Any, allowed: Any) -> Any:
        # masked keys: a moderate fill for the max, then multiplied out by the public mask, so
        # even rows whose allowed scores all sit far below the fill get no weight on them
        filled = jnp.where(allowed, scores, self.mask_fill)
        shifted = filled - jax.lax.stop_gradient(jnp.max(filled, axis=-1, keepdims=True))
        e = jnp.exp(jnp.maximum(shifted, -32.0)) * allowed.astype(scores.dtype)
        return e / jnp.sum(e, axis=-1, keepdims=True)


class SpuOpsPlainNorm(SpuOps):
    """SpuOps with one mean square and one rsqrt per norm (`MpcConfig.norm_range == "plain"`),
    after a public scale 2^pre_shift: for models whose norm inputs a public calibration shows in
    that form's range (veil/mpc/calibration.py)."""

    pre_shift = 0

    def normalize(self, xc: Any) -> Any:
        s = 2.0 ** self.pre_shift
        xs = xc * s
        return xs * jax.lax.rsqrt(jnp.mean(xs * xs, axis=-1, keepdims=True)
                                  + self.cfg.norm_eps * s * s)


def spu_ops(mc: MpcConfig) -> type[SpuOps]:
    """The executor class of the programs for `mc` (its norm form and scale)."""
    if mc.norm_form != "plain":
        return SpuOps
    if mc.norm_shift == 0:
        return SpuOpsPlainNorm
    return type(f"SpuOpsPlainNorm{mc.norm_shift:+d}", (SpuOpsPlainNorm,),
                {"pre_shift": mc.norm_shift})


class StepProgram:
    """A step compiled by SPU for one input shape (batch, new tokens, cache capacity).

    Inputs, in order: the weights ("p:<name>", sorted), the input "x", caches "k<i>", "v<i>" (all
    secret), then "start" and "pos" (public). Outputs of the standard step: "nx" (next one-hot,
    secret), "tok" (token id, revealed to the client only), "logits", caches "ko<i>", "vo<i>".
    With embedding resending (`resend`): "nx" is the last hidden state (the next input and the
    state kept for the LM head), and there is no token until `HeadProgram` runs; `first` marks the
    prompt step, whose "x" is one-hot rows rather than a hidden state. With `mc.reveal ==
    "logits"` the standard step outputs only "logits" (and the caches): the client picks the
    token and inputs the next "x" itself."""

    def __init__(self, cfg: ModelConfig, mc: MpcConfig, param_shapes: dict[str, tuple[int, ...]],
                 batch: int, t_new: int, capacity: int, resend: bool = False,
                 first: bool = True) -> None:
        import spu.libspu as libspu
        import spu.utils.frontend as spu_fe

        argmax = mc.reveal == "tokens"

        self.param_names = sorted(param_shapes)
        L = cfg.n_layers
        ops_cls = spu_ops(mc)
        step = (make_resend_step(cfg, first, ops_cls) if resend
                else make_step(cfg, ops_cls, argmax=argmax, head_softmax=mc.head_softmax))
        n_p = len(self.param_names)

        def flat_step(*flat: Any) -> tuple:
            params = dict(zip(self.param_names, flat[:n_p]))
            x = flat[n_p]
            k, v = list(flat[n_p + 1:n_p + 1 + L]), list(flat[n_p + 1 + L:n_p + 1 + 2 * L])
            start, pos = flat[n_p + 1 + 2 * L], flat[n_p + 2 + 2 * L]
            if resend:
                h, k2, v2 = step(params, x, k, v, start, pos)
                return (h, *k2, *v2)
            if not argmax:
                logits, k2, v2 = step(params, x, k, v, start, pos)
                return (logits, *k2, *v2)
            nxt, tok, logits, k2, v2 = step(params, x, k, v, start, pos)
            return (nxt, tok, logits, *k2, *v2)

        f32 = jnp.float32
        cache = jax.ShapeDtypeStruct((batch, cfg.n_kv_heads, capacity, cfg.head_dim), f32)
        x_dim = cfg.vocab_size if (first or not resend) else cfg.d_model
        specs = ([jax.ShapeDtypeStruct(param_shapes[n], f32) for n in self.param_names]
                 + [jax.ShapeDtypeStruct((batch, t_new, x_dim), f32)]
                 + [cache] * (2 * L)
                 + [jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((batch, t_new), jnp.int32)])
        self.input_names = ([f"p:{n}" for n in self.param_names] + ["x"]
                            + [f"k{i}" for i in range(L)] + [f"v{i}" for i in range(L)] + ["start", "pos"])
        secret, public = libspu.Visibility.VIS_SECRET, libspu.Visibility.VIS_PUBLIC
        vis = [secret] * (n_p + 1 + 2 * L) + [public, public]
        self.output_names = ((["nx"] if resend else ["nx", "tok", "logits"] if argmax
                              else ["logits"])
                             + [f"ko{i}" for i in range(L)] + [f"vo{i}" for i in range(L)])
        self.executable, _ = spu_fe.compile(spu_fe.Kind.JAX, flat_step, tuple(specs), {},
                                            self.input_names, vis, lambda outs: self.output_names)


class HeadProgram:
    """MERGE's LM head, once after the loop: the kept states "h0".."h{n-1}" (secret, (1, 1, d)
    each) → "tok" (1, n) token ids (revealed to the client) and "logits"; without `argmax` only
    "logits" (1, n, V), which the client receives and decodes itself."""

    def __init__(self, cfg: ModelConfig, param_shapes: dict[str, tuple[int, ...]], n: int,
                 argmax: bool = True) -> None:
        import spu.libspu as libspu
        import spu.utils.frontend as spu_fe

        name = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
        head = make_head(cfg, SpuOps, argmax)
        self.input_names = [f"p:{name}"] + [f"h{i}" for i in range(n)]

        def flat_head(table: Any, *states: Any) -> tuple:
            return head({name: table}, jnp.concatenate(states, axis=1))

        f32 = jnp.float32
        specs = ([jax.ShapeDtypeStruct(param_shapes[name], f32)]
                 + [jax.ShapeDtypeStruct((1, 1, cfg.d_model), f32)] * n)
        vis = [libspu.Visibility.VIS_SECRET] * (n + 1)
        self.output_names = ["tok", "logits"] if argmax else ["logits"]
        self.executable, _ = spu_fe.compile(spu_fe.Kind.JAX, flat_head, tuple(specs), {},
                                            self.input_names, vis, lambda outs: self.output_names)


def cache_program(param_shapes: dict[str, tuple[int, ...]]) -> Any:
    """The program that marks every weight variable ("p:<name>") for SPU's Beaver cache, in
    place: SEMI2K then opens a weight's mask at its first product only, and replays the same
    mask (with fresh activation masks) at every later one, across programs, for as long as the
    runtime holds the variable. Run once, after the weights are bound."""
    import spu.libspu as libspu
    import spu.utils.frontend as spu_fe
    from spu.experimental import make_cached_var

    names = [f"p:{n}" for n in sorted(param_shapes)]
    specs = tuple(jax.ShapeDtypeStruct(param_shapes[n], jnp.float32) for n in sorted(param_shapes))
    exe, _ = spu_fe.compile(spu_fe.Kind.JAX, lambda *ws: tuple(make_cached_var(w) for w in ws),
                            specs, {}, names, [libspu.Visibility.VIS_SECRET] * len(names),
                            lambda outs: names)
    return exe


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """Run a party inside a private scratch directory, removed afterwards. SPU's Beaver cache
    keeps each weight's opened (public to the parties, W − B) matrix in a LevelDB it creates in
    the process's working directory — ~8 bytes per weight, per party — and removes it only when
    the runtime is destroyed normally; here it lands in a temporary directory (under $TMPDIR,
    which a launcher points into its own folder) that is removed whatever happens."""
    import os
    import shutil
    import tempfile

    old = os.getcwd()
    path = tempfile.mkdtemp(prefix="veil-spu-")
    os.chdir(path)
    try:
        yield Path(path)
    finally:
        os.chdir(old)
        shutil.rmtree(path, ignore_errors=True)


# ---- shares over the link: raw bytes with a length-prefixed layout (never pickle) ------------

def pack_share(share: Any) -> bytes:
    chunks = [bytes(c) for c in share.share_chunks]
    meta = bytes(share.meta)
    return b"".join([struct.pack("<II", len(meta), len(chunks)), meta,
                     *(struct.pack("<Q", len(c)) + c for c in chunks)])


def unpack_share(blob: bytes, what: str) -> Any:
    import spu.libspu as libspu

    try:
        n_meta, n_chunks = struct.unpack_from("<II", blob, 0)
        off = 8
        meta = blob[off:off + n_meta]
        off += n_meta
        chunks = []
        for _ in range(n_chunks):
            (n,) = struct.unpack_from("<Q", blob, off)
            off += 8
            if off + n > len(blob):
                raise ValueError("chunk past the end")
            chunks.append(blob[off:off + n])
            off += n
        if off != len(blob) or len(meta) != n_meta:
            raise ValueError("length mismatch")
    except (struct.error, ValueError) as exc:
        raise ProtocolAbort(f"malformed share for {what} from a peer ({exc})") from None
    share = libspu.Share()
    share.meta, share.share_chunks = meta, chunks
    return share


class Binder:
    """Puts a party's inputs into its SPU runtime: a secret is split by its owner, who sends each
    peer its share; a public value is bound by everyone alike."""

    def __init__(self, rank: int, world: int, lctx: Any, io: Any, rt: Any) -> None:
        self.rank, self.world, self.lctx, self.io, self.rt = rank, world, lctx, io, rt
        # what this party sent outside SPU's programs (shares of inputs and of opened values):
        # bytes and messages, for cost accounting next to SPU's own link statistics
        self.sent_bytes = self.sends = 0

    @staticmethod
    def open(rank: int, lctx: Any, mc: MpcConfig, profile: bool) -> "Binder":
        """A party's SPU runtime and I/O over link `lctx`. The runtime's protocol set-up talks to
        the peers, so every party opens it at the same point of its exchange. `profile`: SPU's
        per-op time and traffic in its log."""
        import spu.api as spu_api

        rc = mc.runtime_config()
        rc.enable_pphlo_profile = rc.enable_hal_profile = profile
        return Binder(rank, mc.world, lctx, spu_api.Io(mc.world, rc), spu_api.Runtime(lctx, rc))

    def send(self, to: int, blob: bytes) -> None:
        self.lctx.send(to, blob)
        self.sent_bytes += len(blob)
        self.sends += 1

    def secret(self, name: str, value: np.ndarray | None, owner: int) -> None:
        import spu.libspu as libspu

        if self.rank == owner:
            assert value is not None
            shares = self.io.make_shares(value, libspu.Visibility.VIS_SECRET, owner)
            for r in range(self.world):
                if r != self.rank:
                    self.send(r, pack_share(shares[r]))
            self.rt.set_var(name, shares[self.rank])
        else:
            self.rt.set_var(name, unpack_share(self.lctx.recv(owner), name))

    def public(self, name: str, value: np.ndarray) -> None:
        import spu.libspu as libspu

        self.rt.set_var(name, self.io.make_shares(value, libspu.Visibility.VIS_PUBLIC)[self.rank])

    def window(self, start: int, t_new: int) -> None:
        """A step's public inputs: the cache slot it starts at ("start") and the positions of its
        `t_new` tokens ("pos")."""
        self.public("start", np.array(start, np.int32))
        self.public("pos", np.arange(start, start + t_new, dtype=np.int32)[None])

    def inputs(self, cfg: ModelConfig, param_shapes: dict[str, tuple[int, ...]],
               params: dict[str, np.ndarray] | None, prompt: list[int] | None,
               capacity: int, mc: MpcConfig) -> float:
        """A generation's starting inputs: the owner's weights ("p:<name>"), marked for the
        Beaver cache where `mc` asks for it, the client's one-hot prompt ("x"), empty caches
        ("k<i>", "v<i>": public knowledge). Returns the seconds the weights took to share."""
        t0 = time.perf_counter()
        for n in sorted(param_shapes):
            self.secret(f"p:{n}", None if params is None else np.asarray(params[n], np.float32),
                        OWNER)
        if mc.weight_cache and mc.protocol == "semi2k":
            self.rt.run(cache_program(param_shapes))
        share_s = time.perf_counter() - t0
        self.secret("x", one_hot([prompt], cfg.vocab_size) if self.rank == CLIENT else None,
                    CLIENT)
        zeros = np.zeros((1, cfg.n_kv_heads, capacity, cfg.head_dim), np.float32)
        for i in range(cfg.n_layers):
            self.public(f"k{i}", zeros)
            self.public(f"v{i}", zeros)
        return share_s


@dataclass
class PartyResult:
    tokens: list[int]            # the client's view (empty for other parties)
    logits: list[np.ndarray]     # only with reveal_logits (tests: compare with plain)
    step_s: list[float]          # wall time of each step (run + reveal), this party's clock
    compile_s: float = 0.0       # compiling the step programs (once per shape)
    head_s: float = 0.0          # MERGE: the LM head run once after the loop


def spu_error(exc: BaseException) -> str:
    """The meaningful line of an SPU/yacl error ("what: \n [file:line] Get data timeout, …")."""
    import re

    for line in str(exc).splitlines():
        m = re.search(r"\]\s*(\S.*)", line)
        if m:
            return m.group(1)[:300]
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and ln.strip() != "what:"]
    return lines[0][:300] if lines else type(exc).__name__


def party(rank: int, lctx: Any, cfg: ModelConfig, mc: MpcConfig, max_new_tokens: int,
          capacity: int | None,
          param_shapes: dict[str, tuple[int, ...]], params: dict[str, np.ndarray] | None = None,
          prompt: list[int] | None = None, reveal_logits: bool = False,
          on_token: Callable[[int, float], None] | None = None) -> PartyResult:
    """One party's whole generation (see the module docstring). `params` only on the owner,
    `prompt` only on the client, which first tells the others the (public) prompt length and
    token count; `capacity` defaults to their sum. SPU's link and runtime failures (a peer gone
    or stalled past the link's timeout) surface as `ProtocolAbort`."""
    try:
        return _party(rank, lctx, cfg, mc, max_new_tokens, capacity, param_shapes, params, prompt,
                      reveal_logits, on_token)
    except RuntimeError as exc:
        raise ProtocolAbort(f"party {rank}: the protocol failed: {spu_error(exc)}") from None


def _party(rank: int, lctx: Any, cfg: ModelConfig, mc: MpcConfig, max_new_tokens: int,
           capacity: int | None, param_shapes: dict[str, tuple[int, ...]],
           params: dict[str, np.ndarray] | None, prompt: list[int] | None, reveal_logits: bool,
           on_token: Callable[[int, float], None] | None) -> PartyResult:
    world = mc.world
    bind = Binder.open(rank, lctx, mc, profile=mc.profile and rank == OWNER)

    # the prompt's length and the number of new tokens are public (they fix the programs'
    # shapes); the client asks, the others accept up to their own `max_new_tokens`
    # with a digest of the settings every party must share (`MpcConfig.agreement`)
    agreed = mc.agreement(cfg)
    if rank == CLIENT:
        assert prompt is not None
        n_prompt, n_new = len(prompt), max_new_tokens
        for r in range(world):
            if r != CLIENT:
                lctx.send(r, struct.pack("<II", n_prompt, n_new) + agreed)
    else:
        raw = lctx.recv(CLIENT)
        if len(raw) != 8 + len(agreed):
            raise ProtocolAbort("malformed request from the client (prompt length, new tokens, "
                                "settings digest)")
        if raw[8:] != agreed:
            raise ProtocolAbort(f"party {rank} and the client disagree on the protocol settings "
                                "or the model's shape (protocol, field, fxp_bits, exp_iters, "
                                "weight_cache, model config): check both cluster descriptions")
        n_prompt, n_new = struct.unpack("<II", raw[:8])
        if n_new > max_new_tokens:
            raise ProtocolAbort(f"the client asks for {n_new} new tokens, more than the "
                                f"{max_new_tokens} this party allows")
    capacity = capacity or n_prompt + n_new
    if n_prompt < 1 or n_new < 1 or n_prompt + n_new > capacity or n_prompt + n_new > cfg.max_seq_len:
        raise ProtocolAbort(f"a prompt of {n_prompt} tokens plus {n_new} new ones does not fit "
                            f"(capacity {capacity}, model maximum {cfg.max_seq_len})")

    steps = PartySteps(bind, cfg, mc, param_shapes, n_prompt, n_new, capacity,
                       reveal_logits=reveal_logits)
    steps.share_inputs(params, prompt)
    step_s = []
    for i in range(n_new):
        t_step = time.perf_counter()
        steps.step(i)
        step_s.append(time.perf_counter() - t_step)
        if rank == CLIENT and on_token is not None and not steps.resend:
            on_token(steps.tokens[-1], step_s[-1])
    head_s = 0.0
    if steps.head is not None:
        t_head = time.perf_counter()
        steps.run_head()
        head_s = time.perf_counter() - t_head
        if rank == CLIENT and on_token is not None:
            for i, tok in enumerate(steps.tokens):
                on_token(tok, step_s[i] + (head_s if i == len(steps.tokens) - 1 else 0.0))
    return PartyResult(steps.tokens, steps.logits, step_s, steps.compile_s, head_s)


class PartySteps:
    """One party's generation as steps over its runtime: the compiled programs, and what each
    step does around its program — bind the public window (`step_window`), run, `carry` the
    outputs into the next step's inputs, and reveal to the client what `mc.reveal` says (vanilla
    with reveal="logits": the client's pick becomes the next secret input, `input_pick`).
    Generation (`party`) and the fused timing (fused_timing.py) both run these steps, so the
    timing measures what generation runs.

    `n_new`: the generation's new tokens (its last step makes no next input); `head_rows`: the
    kept states MERGE's head reads (default `n_new`); `reveal_logits`: the client also
    reconstructs the logits where only tokens are revealed (tests compare them with plain).
    The client's tokens and reconstructed logits accumulate in `tokens` and `logits`."""

    def __init__(self, bind: Binder, cfg: ModelConfig, mc: MpcConfig,
                 param_shapes: dict[str, tuple[int, ...]], n_prompt: int, n_new: int,
                 capacity: int, head_rows: int | None = None, reveal_logits: bool = False) -> None:
        self.bind, self.cfg, self.mc, self.param_shapes = bind, cfg, mc, param_shapes
        self.n_prompt, self.n_new, self.capacity = n_prompt, n_new, capacity
        self.resend = cfg.generation == "embedding_resend"
        self.by_client = mc.reveal == "logits"       # the client takes the argmax of the logits
        self.reveal_logits = reveal_logits
        t0 = time.perf_counter()
        self.prefill = StepProgram(cfg, mc, param_shapes, 1, n_prompt, capacity, self.resend,
                                   first=True)
        self.decode = (StepProgram(cfg, mc, param_shapes, 1, 1, capacity, self.resend,
                                   first=False) if n_new > 1 else None)
        self.head = (HeadProgram(cfg, param_shapes, head_rows or n_new, not self.by_client)
                     if self.resend else None)
        self.compile_s = time.perf_counter() - t0
        self.tokens: list[int] = []
        self.logits: list[np.ndarray] = []

    def share_inputs(self, params: dict[str, np.ndarray] | None, prompt: list[int] | None) -> float:
        """The owner's weights, the client's prompt, empty caches (`Binder.inputs`); returns the
        seconds the weights took to share."""
        return self.bind.inputs(self.cfg, self.param_shapes, params, prompt, self.capacity,
                                self.mc)

    def step(self, i: int) -> None:
        """Step `i` (0: the prompt) and what it reveals; vanilla's tokens land in `tokens`."""
        prog = self.prefill if i == 0 else self.decode
        assert prog is not None
        self.bind.window(*step_window(self.n_prompt, i))
        self.bind.rt.run(prog.executable)
        carry(self.bind.rt, self.cfg, i, prog)
        if self.resend:                # nothing leaves the runtime until the head
            return
        if self.by_client:
            self._reveal(["logits"])
            if i + 1 < self.n_new:
                mine = self.tokens[-1] if self.bind.rank == CLIENT else None
                input_pick(self.bind, self.cfg, mine)
        else:
            self._reveal(["tok"] + (["logits"] if self.reveal_logits else []))

    def run_head(self) -> None:
        """MERGE's LM head over the kept states "h0".. and what it reveals."""
        assert self.head is not None
        self.bind.rt.run(self.head.executable)
        self._reveal(["logits"] if self.by_client
                     else ["tok"] + (["logits"] if self.reveal_logits else []))

    def _reveal(self, names: list[str]) -> None:
        """The others send the client their shares of `names`; only the client reconstructs."""
        for name in names:
            value = open_to_client(self.bind, name)
            if value is None:
                continue
            if name == "tok":
                got = [int(t) for t in value.reshape(-1)]
                if any(not 0 <= t < self.cfg.vocab_size for t in got):
                    raise ProtocolAbort(f"revealed token(s) {got} outside the vocabulary")
                self.tokens.extend(got)
                continue
            rows = value[0][:, None] if self.resend else value[None]   # per token: (1, V)
            self.logits.extend(rows)
            if self.by_client:
                self.tokens.extend(int(np.argmax(r)) for r in rows)


def open_to_client(bind: Binder, name: str) -> np.ndarray | None:
    """The other parties send the client their shares of variable `name`; the client alone
    reconstructs it (returned there, None elsewhere)."""
    mine = bind.rt.get_var(name)
    if bind.rank != CLIENT:
        bind.send(CLIENT, pack_share(mine))
        return None
    shares = [mine if r == CLIENT else unpack_share(bind.lctx.recv(r), name)
              for r in range(bind.world)]
    return np.asarray(bind.io.reconstruct(shares))


def input_pick(bind: Binder, cfg: ModelConfig, token: int | None) -> None:
    """With reveal="logits" (vanilla): the client's pick — its id on the client, None on the
    others — becomes the next step's secret one-hot input "x"."""
    bind.secret("x", None if token is None else one_hot([[token]], cfg.vocab_size), CLIENT)


def carry(rt: Any, cfg: ModelConfig, step_i: int, prog: StepProgram) -> None:
    """After step `step_i` (run by `prog`): the caches and the next input stay secret-shared in
    the runtime, re-bound as the next step's inputs; with embedding resending the state is also
    kept as "h<step_i>" for the head (nothing is revealed in the loop). A step that makes no
    next input (reveal="logits", vanilla) leaves "x" to the client (`input_pick`)."""
    for i in range(cfg.n_layers):
        rt.set_var(f"k{i}", rt.get_var(f"ko{i}"))
        rt.set_var(f"v{i}", rt.get_var(f"vo{i}"))
    if "nx" not in prog.output_names:
        return
    rt.set_var("x", rt.get_var("nx"))
    if cfg.generation == "embedding_resend":
        rt.set_var(f"h{step_i}", rt.get_var("nx"))


def simulate(cfg: ModelConfig, params: dict[str, np.ndarray], prompt: list[int], max_new_tokens: int,
             mc: MpcConfig = MpcConfig(), capacity: int | None = None,
             reveal_logits: bool = False) -> PartyResult:
    """All parties as threads over SPU's in-memory link (tests); returns the client's result."""
    import threading

    import spu.libspu as libspu

    capacity = capacity or len(prompt) + max_new_tokens
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    desc = libspu.link.Desc()
    for r in range(mc.world):
        desc.add_party(f"party{r}", f"thread_{r}")
    # parties in one process still wait on each other's compiling and input sharing, which for
    # a real model takes minutes; the in-memory link only fails on a bug, so wait long
    desc.recv_timeout_ms = 3_600_000
    results: dict[int, Any] = {}

    def run(rank: int) -> None:
        try:
            lctx = libspu.link.create_mem(desc, rank)
            results[rank] = party(rank, lctx, cfg, mc, max_new_tokens, capacity, shapes,
                                  params if rank == OWNER else None,
                                  prompt if rank == CLIENT else None, reveal_logits)
        except BaseException as exc:       # noqa: BLE001 — re-raised in the caller's thread
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(mc.world)]
    with scratch_dir():
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for r in range(mc.world):
        if isinstance(results.get(r), BaseException):
            raise results[r]
    return results[CLIENT]
