"""Generation: prefill, then one token at a time, with greedy or sampled decoding and stop rules.

Batches of prompts of different lengths are left-padded: every row shares cache slots, positions
restart at each row's first real token, and the padding is masked out of attention.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

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


def generate_ids(cfg: ModelConfig, ops: Ops, prompts: Sequence[Sequence[int]], s: SamplingConfig,
                 stop_check: Callable[[int, list[int]], bool] | None = None,
                 on_token: Callable[[int, int], None] | None = None,
                 ) -> tuple[list[RowResult], GenerationTrace]:
    """Generate for a batch of token-id prompts.

    Args:
        stop_check: called with (row, generated ids) after each token; True ends that row
            (the caller's stop strings live here, since they need the tokenizer).
        on_token: called with (row, token id) as each token is produced (streaming).
    """
    check_prompts(cfg, prompts)
    gen = None
    if not s.greedy:
        gen = torch.Generator().manual_seed(s.seed if s.seed is not None else secrets.randbits(63))
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, mask = pad_batch(prompts, pad_id)
    B, T0 = ids.shape
    capacity = min(T0 + s.max_new_tokens, cfg.max_seq_len)
    valid = torch.ones((B, capacity), dtype=torch.bool)
    valid[:, :T0] = mask
    prefill = padded_step(mask, valid)
    key_valid = prefill.key_valid
    next_pos = prefill.positions[:, -1] + 1                               # (B,)

    trace = GenerationTrace(prompt_tokens=int(mask.sum()))
    rows = [RowResult() for _ in range(B)]
    done = [False] * B
    cache = ops.new_cache(B, capacity)
    if cfg.generation == "embedding_resend":
        return _generate_resend(cfg, ops, ids, prefill, s, gen, cache, rows, trace,
                                stop_check, on_token)
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = forward(cfg, ops, ids, prefill, cache, last_only=True)
        trace.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        slot = T0
        while True:
            nxt = pick_next(logits[:, -1].float(), s, gen)                 # (B,)
            for r in range(B):
                if done[r]:
                    continue
                tok = int(nxt[r])
                rows[r].token_ids.append(tok)
                if on_token is not None:
                    on_token(r, tok)
                if s.stop_on_eos and tok in cfg.eos_token_ids:
                    rows[r].finish_reason, done[r] = "eos", True
                elif stop_check is not None and stop_check(r, rows[r].token_ids):
                    rows[r].finish_reason, done[r] = "stop", True
                elif len(rows[r].token_ids) >= s.max_new_tokens:
                    done[r] = True
                elif slot + 1 >= cfg.max_seq_len:  # prompt + generated fill the context
                    rows[r].finish_reason, done[r] = "context", True
            if all(done):
                break
            step = Step(next_pos[:, None], key_valid, slot)
            logits = forward(cfg, ops, nxt[:, None], step, cache)
            next_pos = next_pos + 1
            slot += 1
            trace.decode_steps += 1
        trace.decode_s = time.perf_counter() - t0
    return rows, trace


def _generate_resend(cfg: ModelConfig, ops: Ops, ids: torch.Tensor, prefill: Step,
                     s: SamplingConfig, gen: torch.Generator | None, cache: object,
                     rows: list[RowResult], trace: GenerationTrace,
                     stop_check: Callable[[int, list[int]], bool] | None,
                     on_token: Callable[[int, int], None] | None,
                     ) -> tuple[list[RowResult], GenerationTrace]:
    """MERGE's embedding resending: the last hidden state is fed back as the next input
    embedding, so the loop has no LM head, sampling or embedding lookup; the LM head runs once
    over all kept states and the tokens are read off afterwards. The length is fixed up front
    (the loop never sees a token), and stop rules cut the finished text."""
    B, T0 = ids.shape
    n_new = min(s.max_new_tokens, cfg.max_seq_len - T0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        h = hidden_states(cfg, ops, ids, prefill, cache)[:, -1:]         # (B, 1, d)
        trace.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        kept = [h]
        next_pos = prefill.positions[:, -1:] + 1                          # (B, 1)
        for slot in range(T0, T0 + n_new - 1):
            h = hidden_states(cfg, ops, None, Step(next_pos, prefill.key_valid, slot), cache,
                              embeds=h)
            kept.append(h)
            next_pos = next_pos + 1
            trace.decode_steps += 1
        logits = ops.lm_head(torch.cat(kept, dim=1)).float()              # (B, n_new, V)
        trace.decode_s = time.perf_counter() - t0
    for r in range(B):
        for j in range(n_new):
            tok = int(pick_next(logits[r:r + 1, j], s, gen)[0])
            rows[r].token_ids.append(tok)
            if on_token is not None:
                on_token(r, tok)
            if s.stop_on_eos and tok in cfg.eos_token_ids:
                rows[r].finish_reason = "eos"
                break
            if stop_check is not None and stop_check(r, rows[r].token_ids):
                rows[r].finish_reason = "stop"
                break
        else:
            if n_new < s.max_new_tokens:
                rows[r].finish_reason = "context"
    return rows, trace
