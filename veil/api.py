"""The Python API: `veil.load(model, scheme=…)` → `Model` with `generate`, `logits`, `cost`.

A scheme is a function (cfg, weights, options) → Ops; `SCHEMES` is the table later schemes join.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch

from veil.backends.plain import TorchOps
from veil.cost import Cost, forward_flops
from veil.errors import InputError, UnsupportedError
from veil.model.config import ModelConfig
from veil.model.opening import open_model
from veil.model.forward import forward
from veil.model.generate import (GenerationTrace, SamplingConfig, check_prompts, generate_ids,
                                 pad_batch, padded_step)
from veil.model.tokenizer import Tokenizer
from veil.model.weights import Weights
from veil.model.ops import Ops, check_support

SchemeBuilder = Callable[[ModelConfig, Weights, dict[str, Any]], Ops]


def _plain(cfg: ModelConfig, weights: Weights, options: dict[str, Any]) -> Ops:
    if options:
        raise UnsupportedError(f"scheme 'plain' takes no options, got {sorted(options)}")
    return TorchOps(cfg, weights)


def _loro(cfg: ModelConfig, weights: Weights, options: dict[str, Any]) -> Ops:
    from veil.tee.runtime import start_loro

    return start_loro(cfg, weights, options)


def _shielded(cfg: ModelConfig, weights: Weights, options: dict[str, Any]) -> Ops:
    """The whole model inside the enclave (MLCapsule/DarkneTZ-style): the device holds nothing."""
    if options:
        raise UnsupportedError(f"scheme 'shielded' takes no options, got {sorted(options)}")
    ops = TorchOps(cfg, weights)
    ops.name = "shielded"
    return ops


def _baseline(scheme: str) -> SchemeBuilder:
    def build(cfg: ModelConfig, weights: Weights, options: dict[str, Any]) -> Ops:
        from veil.tee.schemes.baselines import start_baseline

        return start_baseline(scheme, cfg, weights, options)
    return build


def _mpc(cfg: ModelConfig, weights: Weights, options: dict[str, Any]) -> Ops:
    from veil.mpc.backend import MpcOps

    return MpcOps(cfg, weights, options)  # type: ignore[return-value]


def _merge(cfg: ModelConfig, weights: Weights, options: dict[str, Any]) -> Ops:
    from veil.mpc.backend import MpcOps

    return MpcOps(cfg, weights, options, name="merge")  # type: ignore[return-value]


SCHEMES: dict[str, SchemeBuilder] = {
    "plain": _plain, "loro": _loro, "shielded": _shielded, "mpc": _mpc, "merge": _merge,
    **{s: _baseline(s) for s in ("tlg", "soter", "nnsplitter", "shadownet")},
}

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
    """A loaded model under one scheme."""

    def __init__(self, cfg: ModelConfig, ops: Ops, scheme: str, tokenizer: Tokenizer | None,
                 source: str) -> None:
        self.cfg, self.ops, self.scheme, self.tokenizer, self.source = cfg, ops, scheme, tokenizer, source

    def __repr__(self) -> str:
        return f"Model({self.source!r}, scheme={self.scheme!r}, layers={self.cfg.n_layers}, d={self.cfg.d_model})"

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
        counters = getattr(self.ops, "cost_counters", None)
        before = counters() if counters is not None else {}
        # a protocol that runs the whole generation itself (MPC) instead of the step loop
        run = getattr(self.ops, "private_generate", None) or functools.partial(generate_ids, self.cfg, self.ops)
        rows, trace = run(ids, s, stop_check=stop_check if s.stop else None,
                          on_token=streamer.push if streamer is not None else None)
        after = counters() if counters is not None else {}
        # running totals → this generation's share; the device's resident bytes are a level
        levels = ("device_weight_bytes", "device_store_bytes")
        split = {k: after[k] - (0 if k in levels else before.get(k, 0)) for k in after}
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

    def _cost(self, trace: GenerationTrace, prompt_len: int, new: int,
              split: dict[str, float]) -> Cost:
        flops = forward_flops(self.cfg, prompt_len, prompt_len, head_tokens=1)
        flops += sum(forward_flops(self.cfg, 1, prompt_len + i + 1) for i in range(max(new - 1, 0)))
        return Cost(self.scheme, prompt_len, new, trace.prefill_s, trace.decode_s, flops, split)

    def device_view(self):
        """What the untrusted device saw and holds (TEE schemes; load with record_view=True to
        include every received tensor)."""
        view = getattr(self.ops, "device_view", None)
        if view is None:
            raise UnsupportedError(f"scheme {self.scheme!r} has no untrusted device")
        return view()

    def logits(self, batch: Sequence[Sequence[int]]) -> torch.Tensor:
        """float32 logits (B, T, V) for token-id rows; shorter rows are left-padded (right-aligned)."""
        rows = [[int(t) for t in r] for r in batch]
        check_prompts(self.cfg, rows)
        pad = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0
        ids, mask = pad_batch(rows, pad)
        cache = self.ops.new_cache(ids.shape[0], ids.shape[1])
        with torch.inference_mode():
            out = forward(self.cfg, self.ops, ids, padded_step(mask, mask), cache)
        return out.float()


def load(model: str | Path = "default", scheme: str = "plain", **options: Any) -> Model:
    """Load a model under a scheme: `"default"`, a tiny preset name, an HF folder, a .gguf, or a
    protected artifact folder made by `veil protect` (its scheme is recorded in it)."""
    from veil.tee.artifact import is_artifact, load_artifact

    if is_artifact(model):
        return load_artifact(Path(model), scheme, options)
    if scheme not in SCHEMES:
        raise UnsupportedError(f"unknown scheme {scheme!r} (available: {', '.join(SCHEMES)})")
    opened = open_model(model)
    if scheme in ("mpc", "merge"):   # local party processes open the model by the same name
        options = {"model": str(model), **options}
    ops = SCHEMES[scheme](opened.cfg, opened.weights, dict(options))
    check_support(ops, opened.cfg)
    return Model(opened.cfg, ops, scheme, opened.tokenizer, opened.source)
