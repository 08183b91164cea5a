"""What the harness asks of a benchmark worker process: one typed spec, passed as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass

from veil.errors import ConfigError

BENCH_PROMPT = "The history of cryptography began"


@dataclass(frozen=True)
class WorkerSpec:
    """What a benchmark worker process measures (passed to it as one JSON argument)."""

    mode: str            # worker.py: speed | memory-veil | memory-hf; tee.py: "tee"
    model: str
    repeats: int
    new_tokens: int
    prompt: str = BENCH_PROMPT

    def __post_init__(self) -> None:
        for name, kind in (("mode", str), ("model", str), ("repeats", int), ("new_tokens", int),
                           ("prompt", str)):
            value = getattr(self, name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(f"benchmark worker spec: {name} must be {kind.__name__}, "
                                  f"got {value!r}")

    @staticmethod
    def from_argv(argv: list[str]) -> "WorkerSpec":
        if len(argv) != 1:
            raise ConfigError("a benchmark worker takes one argument: its spec as JSON")
        try:
            raw = json.loads(argv[0])
            return WorkerSpec(**raw)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"benchmark worker spec: {exc}") from None
