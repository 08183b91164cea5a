"""The Python API: `veil.load(model, scheme=…)` → `Model` with `generate`, `logits`, `cost`,
`device_view`, `close`. Schemes come from the registry (veil/schemes/)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch

from veil import schemes
from veil.cost import Cost, generation_flops
from veil.errors import InputError, UnsupportedError
from veil.model.forward import forward
from veil.model.generate import (GenerationTrace, SamplingConfig, check_prompts, generate_fixed,
                                 generate_ids, pad_batch, padded_step)
from veil.model.opening import open_model
from veil.model.ops import check_support
from veil.model.tokenizer import Tokenizer
from veil.schemes.artifacts import open_artifact
from veil.schemes.base import DeviceViewing, FixedLengthSession, Session, StepSession
from veil.tee.artifact import is_artifact

Prompt = Union[str, Sequence[int]]


@dataclass(frozen=True)
class Generation:
    """One prompt's result: `text` (generated part only), generated `token_ids`, `cost`."""

    text: str
    token_ids: list[int]
    finish_reason: str
    cost: Cost


def _cut_at_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    found = [text.find(x) for x in stops if x in text]
    return min(found) if found else None


class _TextStream:
    """Turns generated token ids into text pieces for a streaming callback.

    Holds back a partial multi-byte character, and any tail that could still become a stop string,
    so the pieces always concatenate to the final text.
    """

    def __init__(self, decode: Callable[[list[int]], str], emit: Callable[[str], None],
                 stops: Sequence[str]) -> None:
        self.decode, self.emit, self.stops = decode, emit, stops
        self.ids: list[int] = []
        self.shown = 0

    def _safe_length(self, text: str) -> int:
        cut = _cut_at_stop(text, self.stops)
        if cut is not None:
            return cut
        safe = len(text) - 1 if text.endswith("\ufffd") else len(text)
        for stop in self.stops:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        return safe

    def push(self, row: int, tok: int) -> None:
        self.ids.append(tok)
        text = self.decode(self.ids)
        safe = self._safe_length(text)
        if safe > self.shown:
            self.emit(text[self.shown:safe])
            self.shown = safe

    def finish(self, final_text: str) -> None:
        if len(final_text) > self.shown:
            self.emit(final_text[self.shown:])


class Model:
    """A loaded model under one scheme. `close()` (or leaving a `with` block) stops whatever the
    scheme started — device threads and processes, party processes, channels — and wipes its
    secrets; a model never closed is closed when it is garbage-collected or at interpreter exit,
    before module teardown."""

    def __init__(self, session: Session, tokenizer: Tokenizer | None, source: str) -> None:
        self.session, self.tokenizer, self.source = session, tokenizer, source
        self.cfg, self.scheme = session.cfg, session.scheme
        self._finalizer = weakref.finalize(self, session.close)

    def __repr__(self) -> str:
        return f"Model({self.source!r}, scheme={self.scheme!r}, layers={self.cfg.n_layers}, d={self.cfg.d_model})"

    def close(self) -> None:
        """Stop what the scheme started and wipe its secrets. Idempotent."""
        self._finalizer()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live(self) -> Session:
        if self.session.closed:
            raise InputError(f"{self!r} was closed")
        return self.session

    @property
    def ops(self) -> Any:
        """The executor of a step-by-step scheme (plain, the TEE schemes)."""
        session = self._live()
        if not isinstance(session, StepSession):
            raise UnsupportedError(f"scheme {self.scheme!r} runs whole generations; it has no Ops")
        return session.ops

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError(f"{self.source} has no tokenizer: pass token ids, not text")
            return self.tokenizer.chat(prompt) if chat else self.tokenizer.encode(prompt)
        if chat:
            raise InputError("chat=True needs a text prompt")
        return [int(t) for t in prompt]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def generate(self, prompt: Prompt | Sequence[Prompt], max_new_tokens: int = 32,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: Sequence[str] = (), chat: bool = False,
                 stream: Callable[[str], None] | None = None, ignore_eos: bool = False) -> Any:
        """Generate from one prompt (text or token ids) → `Generation`, or a list → list.

        stream: called with each new piece of text as it is produced (single prompts only).
        ignore_eos: keep going past EOS (benchmarks that need a fixed token count).
        """
        session = self._live()
        single = isinstance(prompt, str) or (len(prompt) > 0 and isinstance(prompt[0], int))
        prompts = [prompt] if single else list(prompt)
        if stream is not None and not single:
            raise InputError("streaming works with one prompt at a time")
        if stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer; this model has none")
        s = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, stop=tuple(stop), stop_on_eos=not ignore_eos)
        ids = [self.encode(p, chat) for p in prompts]

        def stop_check(row: int, generated: list[int]) -> bool:
            return _cut_at_stop(self.decode(generated), s.stop) is not None

        streamer = _TextStream(self.decode, stream, s.stop) if stream is not None else None
        hooks = dict(stop_check=stop_check if s.stop else None,
                     on_token=streamer.push if streamer is not None else None)
        split = None
        if isinstance(session, FixedLengthSession):
            with session.running():
                rows, trace = generate_fixed(self.cfg, session.run_fixed, ids, s, **hooks)
        else:
            assert isinstance(session, StepSession)
            before = session.counters()
            with session.running():
                rows, trace = generate_ids(self.cfg, session.ops, ids, s, **hooks)
            after = session.counters()
            split = after.since(before) if after is not None and before is not None else None
        out = []
        for r, row in enumerate(rows):
            text = self.decode(row.token_ids)
            cut = _cut_at_stop(text, s.stop)
            if row.finish_reason == "stop" and cut is not None:
                text = text[:cut]
            out.append(Generation(text, row.token_ids, row.finish_reason,
                                  self._cost(trace, len(ids[r]), len(row.token_ids), split)))
        if streamer is not None:
            streamer.finish(out[0].text)
        return out[0] if single else out

    def _cost(self, trace: GenerationTrace, prompt_len: int, new: int, split: Any) -> Cost:
        return Cost(self.scheme, prompt_len, new, trace.prefill_s, trace.decode_s,
                    generation_flops(self.cfg, prompt_len, new), split)

    def device_view(self) -> Any:
        """What the untrusted device saw and holds (TEE schemes; load with record_view=True to
        include every received tensor)."""
        session = self._live()
        if not isinstance(session, DeviceViewing):
            raise UnsupportedError(f"scheme {self.scheme!r} has no untrusted device")
        return session.device_view()

    def logits(self, batch: Sequence[Sequence[int]]) -> torch.Tensor:
        """float32 logits (B, T, V) for token-id rows; shorter rows are left-padded (right-aligned)."""
        session = self._live()
        if not isinstance(session, StepSession):
            raise UnsupportedError(f"scheme {self.scheme!r} runs whole generations; per-call "
                                   "logits are not offered")
        try:
            if isinstance(batch, str) or any(isinstance(r, str) for r in batch):
                raise TypeError
            rows = [[int(t) for t in r] for r in batch]
        except (TypeError, ValueError):
            raise InputError("logits takes a batch: a list of token-id rows (one row: [ids])"
                             ) from None
        check_prompts(self.cfg, rows)
        pad = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0
        ids, mask = pad_batch(rows, pad)
        with session.running():
            cache = session.ops.new_cache(ids.shape[0], ids.shape[1])
            with torch.inference_mode():
                out = forward(self.cfg, session.ops, ids, padded_step(mask, mask), cache)
        return out.float()


def load(model: str | Path = "default", scheme: str = "plain", **options: Any) -> Model:
    """Load a model under a scheme: `"default"`, a tiny preset name, an HF folder, a .gguf, or a
    protected artifact folder made by `veil protect` (its scheme is recorded in it).

    Options are the scheme's (`veil schemes` lists them); names, types and ranges are checked,
    and the model's variants against the scheme's support table, before anything is started."""
    if is_artifact(model):
        session, tokenizer = open_artifact(Path(model), scheme, options)
        return Model(session, tokenizer, str(model))
    s = schemes.get(scheme)
    opts = s.options.parse(scheme, options)
    opened = open_model(model)
    check_support(s.support, opened.cfg, f"scheme {scheme!r}")
    if s.check_model is not None:
        s.check_model(opened.cfg)
    return Model(s.open(opened, opts), opened.tokenizer, opened.source)
