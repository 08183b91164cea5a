"""Generation: prefill, then one token at a time, with greedy or sampled decoding and stop rules.

Batches of prompts of different lengths are left-padded: every row shares cache slots, positions
restart at each row's first real token, and the padding is masked out of attention.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from veil.errors import InputError
from veil.model.config import ModelConfig
from veil.model.forward import forward, hidden_states
from veil.model.ops import Ops, Step


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. temperature 0 means greedy (the default)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise InputError(f"temperature must be a finite number ≥ 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise InputError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float))
                                           and 0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RowResult:
    """One prompt's generation: the generated ids (prompt excluded) and why it ended."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # length | eos | stop | context


@dataclass
class GenerationTrace:
    """Timings of one `generate_ids` call (wall seconds)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    decode_steps: int = 0


def pick_next(logits: torch.Tensor, s: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits (B, V) → (B,)."""
    if s.greedy:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]           # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p is not None and s.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= s.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def pad_batch(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts: ids (B, T) and a bool mask (B, T) of real tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for r, p in enumerate(prompts):
        if len(p):
            ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[r, width - len(p):] = True
    return ids, mask


def padded_step(mask: torch.Tensor, key_valid: torch.Tensor) -> Step:
    """The prefill `Step` of a left-padded batch: positions restart at each row's first real
    token; padding is masked only when some row has it."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)                 # (B, T)
    return Step(positions, None if bool(mask.all()) else key_valid, 0)


def check_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]]) -> None:
    if not prompts:
        raise InputError("no prompt given")
    for r, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"prompt {r} is empty")
        if len(p) >= cfg.max_seq_len:
            raise InputError(f"prompt {r} has {len(p)} tokens; the model's context is "
                             f"{cfg.max_seq_len} (leave room for at least one new token)")
        bad = [t for t in p if not (isinstance(t, int) and 0 <= t < cfg.vocab_size)]
        if bad:
            raise InputError(f"prompt {r}: token id(s) {bad[:5]} outside the vocabulary "
                             f"[0, {cfg.vocab_size})")


def sampler(s: SamplingConfig) -> torch.Generator | None:
    """The generator of a sampled generation (None when greedy). Sampling is the user's own
    randomness, not a secret of any scheme: a seed makes it reproducible."""
    if s.greedy:
        return None
    return torch.Generator().manual_seed(s.seed if s.seed is not None else secrets.randbits(63))


def step_window(n_prompt: int, i: int) -> tuple[int, int]:
    """(first cache slot, new tokens) of step `i` of a generation: step 0 is the prompt (slots
    0 … n_prompt − 1), every later step writes one slot after it. Every executor's loop — this
    module's, the MPC parties', the plaintext jax reference — steps through these windows."""
    return (0, n_prompt) if i == 0 else (n_prompt + i - 1, 1)


@dataclass(frozen=True)
class Batch:
    """A left-padded batch of prompts: ids (B, T0), its prefill `Step`, and the cache capacity
    the generation needs."""

    ids: torch.Tensor
    prefill: Step
    capacity: int

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def decode_step(self, i: int) -> Step:
        """The `Step` of decode step i (0 = the first token after the prompt): one new token per
        row, at cache slot T0 + i."""
        slot, _ = step_window(self.width, i + 1)
        positions = self.prefill.positions[:, -1:] + 1 + i                    # (B, 1)
        return Step(positions, self.prefill.key_valid, slot)


def start_batch(cfg: ModelConfig, prompts: Sequence[Sequence[int]], s: SamplingConfig) -> Batch:
    """Check and pad `prompts`; the cache holds the prompt and the tokens asked for, within the
    model's context."""
    check_prompts(cfg, prompts)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, mask = pad_batch(prompts, pad_id)
    B, T0 = ids.shape
    capacity = min(T0 + s.max_new_tokens, cfg.max_seq_len)
    valid = torch.ones((B, capacity), dtype=torch.bool)
    valid[:, :T0] = mask
    return Batch(ids, padded_step(mask, valid), capacity)


class Finisher:
    """The finish rules of a generation, row by row, in order: EOS, stop strings, the length
    asked for, the model's context. Every way of generating feeds its tokens through one of these,
    so a rule holds for every scheme alike.

    stop_check: called with (row, generated ids) after each token; True ends that row (the
    caller's stop strings live here, since they need the tokenizer).
    on_token: called with (row, token id) as each token is accepted (streaming)."""

    def __init__(self, cfg: ModelConfig, s: SamplingConfig, batch: int,
                 stop_check: Callable[[int, list[int]], bool] | None = None,
                 on_token: Callable[[int, int], None] | None = None) -> None:
        self.cfg, self.s, self.stop_check, self.on_token = cfg, s, stop_check, on_token
        self.rows = [RowResult() for _ in range(batch)]
        self.done = [False] * batch

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def push(self, r: int, tok: int, next_slot: int | None = None) -> bool:
        """Accept row r's next token; True when the row is finished. `next_slot`: the cache slot
        the token would be written to by the next step (stepped generation), for the context
        rule; None when the length was fixed up front."""
        row = self.rows[r]
        row.token_ids.append(tok)
        if self.on_token is not None:
            self.on_token(r, tok)
        if self.s.stop_on_eos and tok in self.cfg.eos_token_ids:
            row.finish_reason = "eos"
        elif self.stop_check is not None and self.stop_check(r, row.token_ids):
            row.finish_reason = "stop"
        elif len(row.token_ids) >= self.s.max_new_tokens:
            row.finish_reason = "length"
        elif next_slot is not None and next_slot + 1 >= self.cfg.max_seq_len:
            row.finish_reason = "context"   # prompt + generated fill the context
        else:
            return False
        self.done[r] = True
        return True

    def push_step(self, tokens: torch.Tensor, next_slot: int) -> None:
        """One token (B,) for every row still going."""
        for r in range(len(self.rows)):
            if not self.done[r]:
                self.push(r, int(tokens[r]), next_slot)

    def take_fixed(self, r: int, tokens: Iterable[int]) -> None:
        """Row r's tokens from a generation whose length was fixed up front (embedding resending,
        MPC): accepted until a rule ends the row; consumed lazily, so a sampled row draws only
        what it keeps. A row that ran out before its length was cut short by the context."""
        for tok in tokens:
            if self.push(r, int(tok)):
                return
        self.rows[r].finish_reason = "context"
        self.done[r] = True


def prefill(cfg: ModelConfig, ops: Ops, batch: Batch, cache: Any) -> Any:
    """The prompt's forward: logits (B, 1, V) of each row's last position."""
    return forward(cfg, ops, batch.ids, batch.prefill, cache, last_only=True)


def decode_one(cfg: ModelConfig, ops: Ops, tokens: torch.Tensor, step: Step, cache: Any) -> Any:
    """One decode step: the tokens (B,) just picked → logits (B, 1, V) of the next."""
    return forward(cfg, ops, tokens[:, None], step, cache)


def generate_ids(cfg: ModelConfig, ops: Ops, prompts: Sequence[Sequence[int]], s: SamplingConfig,
                 stop_check: Callable[[int, list[int]], bool] | None = None,
                 on_token: Callable[[int, int], None] | None = None,
                 ) -> tuple[list[RowResult], GenerationTrace]:
    """Generate for a batch of token-id prompts through `ops`: prefill, then one decode step per
    token, until the `Finisher` ends every row (see it for stop_check and on_token)."""
    batch = start_batch(cfg, prompts, s)
    gen = sampler(s)
    fin = Finisher(cfg, s, batch.ids.shape[0], stop_check, on_token)
    trace = GenerationTrace(prompt_tokens=int(sum(len(p) for p in prompts)))
    cache = ops.new_cache(batch.ids.shape[0], batch.capacity)
    if cfg.generation == "embedding_resend":
        _generate_resend(cfg, ops, batch, s, gen, cache, fin, trace)
        return fin.rows, trace
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = prefill(cfg, ops, batch, cache)
        trace.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        i = 0
        while True:
            nxt = pick_next(logits[:, -1].float(), s, gen)                 # (B,)
            fin.push_step(nxt, batch.width + i)
            if fin.all_done:
                break
            logits = decode_one(cfg, ops, nxt, batch.decode_step(i), cache)
            i += 1
            trace.decode_steps += 1
        trace.decode_s = time.perf_counter() - t0
    return fin.rows, trace


def _generate_resend(cfg: ModelConfig, ops: Ops, batch: Batch, s: SamplingConfig,
                     gen: torch.Generator | None, cache: Any, fin: Finisher,
                     trace: GenerationTrace) -> None:
    """MERGE's embedding resending: the last hidden state is fed back as the next input
    embedding, so the loop has no LM head, sampling or embedding lookup; the LM head runs once
    over all kept states and the tokens are read off afterwards. The length is fixed up front
    (the loop never sees a token), and the finish rules cut each row afterwards."""
    n_new = min(s.max_new_tokens, cfg.max_seq_len - batch.width)
    with torch.inference_mode():
        t0 = time.perf_counter()
        h = hidden_states(cfg, ops, batch.ids, batch.prefill, cache)[:, -1:]   # (B, 1, d)
        trace.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        kept = [h]
        for i in range(n_new - 1):
            h = hidden_states(cfg, ops, None, batch.decode_step(i), cache, embeds=h)
            kept.append(h)
            trace.decode_steps += 1
        logits = ops.lm_head(torch.cat(kept, dim=1)).float()              # (B, n_new, V)
        trace.decode_s = time.perf_counter() - t0
    for r in range(batch.ids.shape[0]):
        fin.take_fixed(r, (int(pick_next(logits[r:r + 1, j], s, gen)[0]) for j in range(n_new)))


def generate_fixed(cfg: ModelConfig,
                   run: Callable[[list[int], SamplingConfig], tuple[list[int], GenerationTrace]],
                   prompts: Sequence[Sequence[int]], s: SamplingConfig,
                   stop_check: Callable[[int, list[int]], bool] | None = None,
                   on_token: Callable[[int, int], None] | None = None,
                   ) -> tuple[list[RowResult], GenerationTrace]:
    """Generation by a protocol that must produce exactly the length asked for (MPC: stopping at
    EOS would tell the other parties how long the answer is). `run(prompt, s)` returns the
    prompt's tokens and timings; the same finish rules then cut them, as the client would."""
    check_prompts(cfg, prompts)
    fin = Finisher(cfg, s, len(prompts), stop_check, on_token)
    trace = GenerationTrace()
    for r, prompt in enumerate(prompts):
        tokens, t = run([int(x) for x in prompt], s)
        fin.take_fixed(r, tokens)
        trace.prefill_s += t.prefill_s
        trace.decode_s += t.decode_s
        trace.prompt_tokens += t.prompt_tokens
        trace.decode_steps += t.decode_steps
    return fin.rows, trace
