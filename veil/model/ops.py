"""The `Ops` interface: everything the forward algorithm may do to a tensor.

The forward (veil/model/forward.py) is written once against this protocol; each backend supplies
an implementation that owns its weights (addressed by canonical name, never passed as tensors) and
its caches. A backend declares the variants it supports in `support`; `check_support` refuses a
model the backend cannot run, naming the op, instead of silently falling back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from veil.errors import UnsupportedError
from veil.model.config import ModelConfig

# op → the config knob that selects its variant (the support table's rows).
VARIANT_KNOBS = {"norm": "norm", "activation": "activation", "mlp": "mlp",
                 "position": "position", "attention": "attention", "generation": "generation"}


@dataclass(frozen=True)
class Step:
    """Where a forward call sits in the sequence.

    positions: (B, T) position ids of the new tokens (left padding makes them differ per row).
    key_valid: (B, S) True where cache slot s (after this step's append) holds a real token,
      or None when no row is padded (then plain causal attention applies).
    start: cache slot of the first new token (all rows share slots; padding is on the left).
    """

    positions: Any
    key_valid: Any | None
    start: int


class Ops(Protocol):
    """What a backend provides. `X` is the backend's tensor type, laid out (B, T, features)."""

    name: str
    support: Mapping[str, frozenset[str]]

    def new_cache(self, batch: int, capacity: int) -> Any: ...  # a KV cache for `capacity` slots
    def embed(self, ids: Any) -> Any: ...                      # (B, T) ids → (B, T, d)
    def pos_embed(self, positions: Any) -> Any: ...            # (B, T) → (B, T, d)
    def norm(self, x: Any, name: str) -> Any: ...              # (B, T, d) → (B, T, d)
    def linear(self, x: Any, name: str) -> Any: ...            # (B, T, in) → (B, T, out)
    # Several projections of one input (q/k/v; gate/up): a backend may fuse them into one matmul
    # or one round trip. Returns one output per name, in order.
    def linears(self, x: Any, names: tuple[str, ...]) -> tuple[Any, ...]: ...
    def rope(self, q: Any, k: Any, step: Step) -> tuple[Any, Any]: ...
    def attention(self, layer: int, q: Any, k: Any, v: Any, step: Step, cache: Any) -> Any: ...
    def activation(self, x: Any) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...
    def add(self, a: Any, b: Any) -> Any: ...
    def last_position(self, x: Any) -> Any: ...                # (B, T, d) → (B, 1, d)
    def lm_head(self, x: Any) -> Any: ...                      # (B, T, d) → (B, T, V)


def check_support(support: Mapping[str, frozenset[str]], cfg: ModelConfig, who: str) -> None:
    """Raise `UnsupportedError` naming the first op variant of `cfg` that the table `support` (of
    a backend, or a scheme: `who`) does not list."""
    for op, knob in VARIANT_KNOBS.items():
        value = getattr(cfg, knob)
        allowed = support.get(op, frozenset())
        if value not in allowed:
            raise UnsupportedError(f"{who} cannot run {op}={value!r} "
                                   f"(it supports: {', '.join(sorted(allowed)) or 'nothing'})")
