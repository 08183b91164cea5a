"""What a scheme is: a name, validated options, a support table, placement rows, how it opens a
session (and, for TEE schemes, how it protects a model into an artifact).

Each scheme is one module that defines a `Scheme`; veil/schemes/__init__.py lists them. The facade
(`veil.load`), `veil protect`, `veil explain`, `veil schemes`, the benches and the conformance
suite read that list and nothing else.
"""

from __future__ import annotations

import contextlib

import math
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, Callable, Literal, Mapping, TypeVar

from veil.cost import SplitCost
from veil.errors import ConfigError
from veil.model.config import ModelConfig
from veil.model.generate import GenerationTrace, SamplingConfig
from veil.model.opening import OpenedModel
from veil.model.ops import Ops

O = TypeVar("O", bound="SchemeOptions")


# ---- options -------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('an ').removeprefix('a ')}s"
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """`value` as option `name` of type `tp`, or ConfigError naming the option and the type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(name, inner[0], value)
    ok: bool
    if origin is Literal:
        ok = value in typing.get_args(tp) and not isinstance(value, bool)
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is tuple:
        ok = isinstance(value, (list, tuple))
        if ok:
            return tuple(_coerce(name, typing.get_args(tp)[0], v) for v in value)
    else:
        raise AssertionError(f"option {name}: type {tp} has no coercion")
    if not ok:
        raise ConfigError(f"option {name!r} expects {_type_name(tp)}, got {value!r}")
    return value


class SchemeOptions:
    """Base of every scheme's options: a frozen dataclass whose fields are what a user may set
    (`veil.load(m, scheme, **options)`, `--set KEY=VALUE`). `parse` checks names and types;
    a subclass's `__post_init__` checks ranges, raising `ConfigError` naming the option."""

    @classmethod
    def parse(cls: type[O], scheme: str, raw: Mapping[str, Any]) -> O:
        known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(raw) - set(known))
        try:
            if unknown:
                raise ConfigError(f"unknown option(s) {unknown} (it takes: "
                                  f"{', '.join(known) or 'no options'})")
            hints = typing.get_type_hints(cls)
            return cls(**{k: _coerce(k, hints[k], v) for k, v in raw.items()})
        except ConfigError as exc:
            raise type(exc)(f"{scheme}: {exc}") from None


@dataclass(frozen=True)
class NoOptions(SchemeOptions):
    """A scheme that takes no options."""


# ---- what `veil explain` prints, and what the conformance suite holds it to ------------------

@dataclass(frozen=True)
class Placement:
    """Where one op of the forward runs under a scheme and what the untrusted side sees.

    holds / receives: shell-style patterns (fnmatch) over the names in the recorded device view
    (`View.resident`, and `View.received` as "<op>:<names or layer>:<index>") that this row
    accounts for. The conformance suite checks that every name in a recorded view is claimed by
    some row and every row's patterns match something: what `explain` says is what the device has.
    """

    op: str
    runs_on: str            # host | enclave | device | device + enclave | all parties | …
    device_receives: str    # what crosses the boundary for this op ("—" if nothing)
    device_holds: str       # what stays resident on the untrusted side ("—" if nothing)
    leaks: str = ""         # non-empty: what this placement gives away (flagged by `explain`)
    holds: tuple[str, ...] = ()
    receives: tuple[str, ...] = ()


@dataclass(frozen=True)
class Tolerance:
    """How close a scheme's logits are to plain's (max |Δlogit|), on the tiny presets and on the
    default model. Every scheme in veil is exact up to rounding: its greedy tokens must be plain's."""

    tiny: float
    default: float


# ---- sessions: one opened model under a scheme ----------------------------------------------

class Session(ABC):
    """What `veil.Model` drives. `close` releases everything the session started (threads,
    processes, channels, scratch directories) and wipes the secrets it made; it is idempotent."""

    def __init__(self, scheme: str, cfg: ModelConfig) -> None:
        self.scheme, self.cfg = scheme, cfg
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._release()

    def _release(self) -> None:
        """Subclasses: stop what they started."""

    def running(self) -> contextlib.AbstractContextManager:
        """Entered around each generation or forward the session runs (a TEE session sets the
        enclave's torch threads there; veil/tee/placement.py)."""
        return contextlib.nullcontext()


class StepSession(Session):
    """Generations run the one generation loop (veil/model/generate.py) over `ops`: prefill,
    then one forward per token. `counters` is the running total of a split run's costs (None when
    nothing is split)."""

    def __init__(self, scheme: str, cfg: ModelConfig, ops: Ops) -> None:
        super().__init__(scheme, cfg)
        self.ops = ops

    def counters(self) -> SplitCost | None:
        return None


class FixedLengthSession(Session):
    """Each generation is one protocol run of exactly the length asked for (stopping early would
    tell the other parties the answer's length); the one loop's finish rules then cut the tokens,
    as the client would (`generate_fixed`). No per-call logits."""

    @abstractmethod
    def run_fixed(self, prompt: list[int], s: SamplingConfig) -> tuple[list[int], GenerationTrace]:
        """The prompt's `s.max_new_tokens` tokens, and the run's timings."""


class EnclaveHolding(ABC):
    """A session whose trusted side keeps secrets in memory (the TEE schemes)."""

    @abstractmethod
    def resident_secret_bytes(self) -> int:
        """The enclave's resident secret bytes (its parameters and the scheme's secrets)."""


class DeviceViewing(ABC):
    """A session with an untrusted device whose view can be read (`Model.device_view`)."""

    @abstractmethod
    def device_view(self) -> Any:
        """What the device holds now and, when recording, everything it received
        (veil.tee.device.View)."""


# ---- protection into an artifact ---------------------------------------------------------------

class Sealable(typing.Protocol):
    """Secret material that `veil protect` seals: tensors plus JSON metadata, and back."""

    def to_sealable(self) -> tuple[dict[str, Any], dict[str, Any]]: ...


@dataclass
class Protected:
    """A scheme's offline step: the enclave's secrets and what the device may hold."""

    secrets: Sealable
    device_weights: dict[str, Any]


# ---- the scheme ---------------------------------------------------------------------------------

Support = Mapping[str, frozenset[str]]


@dataclass(frozen=True)
class Scheme:
    """One scheme, as every layer above sees it.

    open: (opened model, options) → session — the in-memory path of `veil.load`.
    protect / open_protected: the artifact path (`veil protect`, `veil.load(DIR)`), for schemes
    with an enclave; `artifact_options` are what loading an artifact takes (no protect-time ones).
    check_model: model conditions a support table cannot say (MERGE needs a MERGE model).
    describe: what the scheme will do with one model and options, as lines (`veil explain`).
    """

    name: str
    system: str                 # the system and paper, for tables
    protects: str
    trusted: str
    sees: str                   # what the untrusted side sees, in one line
    kind: str                   # host | tee | mpc  (benches pick their contenders by kind)
    status: str                 # one line for the README's scheme table
    options: type[SchemeOptions]
    support: Support
    placement: tuple[Placement, ...]
    tolerance: Tolerance
    open: Callable[[OpenedModel, Any], Session]
    protect: Callable[[OpenedModel, Any], Protected] | None = None
    open_protected: Callable[[Any, Any], Session] | None = None   # (tee.artifact.Opened, options)
    artifact_options: type[SchemeOptions] = NoOptions
    check_model: Callable[[ModelConfig], None] | None = None
    # model-specific lines for `veil explain --model` (he: where its depth plan refreshes)
    describe: Callable[[ModelConfig, Any], list[str]] | None = None

