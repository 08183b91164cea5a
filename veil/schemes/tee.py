"""What every TEE scheme shares: where its untrusted device runs (options), and the session that
drives the enclave's Ops over it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import torch

from veil.cost import SplitCost
from veil.errors import ConfigError
from veil.schemes.base import DeviceViewing, EnclaveHolding, SchemeOptions, StepSession
from veil.tee.device import View
from veil.tee.placement import Placement, choose, enclave_threads, process_pays
from veil.tee.process import DeviceHandle
from veil.tee.runtime import TeeModelOps, start_device


@dataclass(frozen=True)
class DeviceOptions(SchemeOptions):
    """The untrusted device: a thread speaking the wire protocol or its own OS process (the
    default for an artifact, and for `veil.load` of a model large enough on a machine with two
    or more cores: `process_pays` in veil/tee/placement.py); its torch threads, its cores and
    how both sides wait on the channel (process only; unset, veil/tee/placement.py chooses them
    for the machine); whether it records everything it receives (`Model.device_view`)."""

    device: Literal["thread", "process"] | None = None
    device_threads: int | None = None
    device_cpus: tuple[int, ...] | None = None
    wait: Literal["auto", "spin", "block"] = "auto"
    record_view: bool = False

    def __post_init__(self) -> None:
        if self.device_threads is not None and self.device_threads < 1:
            raise ConfigError(f"option 'device_threads' must be ≥ 1, got {self.device_threads}")
        if self.device_cpus is not None and (not self.device_cpus
                                             or any(c < 0 for c in self.device_cpus)):
            raise ConfigError(f"option 'device_cpus' must list core numbers, got {self.device_cpus}")
        if self.wait not in ("auto", "spin", "block"):
            raise ConfigError(f"option 'wait' must be 'auto', 'spin' or 'block', got {self.wait!r}")
        if self.device == "thread" and self._process_only():
            raise ConfigError(self._process_only())

    def _process_only(self) -> str:
        """The complaint when options only a device process takes are set, or ""."""
        if self.device_threads is None and self.device_cpus is None and self.wait == "auto":
            return ""
        return "options 'device_threads', 'device_cpus' and 'wait' need device='process'"

    def mode(self, default: str, scheme: str, weights: Any = None) -> str:
        """The device mode for a path whose default is `default`, checked against the options
        that only a process takes (before anything is started). Given the model's `weights`, an
        unset `device` on a "thread" path becomes a process where that pays
        (`process_pays`)."""
        mode = self.device or default
        if self.device is None and mode == "thread" and weights is not None \
                and not self.record_view and process_pays(weights):
            mode = "process"
        if mode == "thread" and self._process_only():
            raise ConfigError(f"{scheme}: {self._process_only()}")
        return mode

    def placement(self, mode: str) -> Placement | None:
        """Threads, cores and waits for a device process (None for a thread: it shares this
        process's torch threads)."""
        if mode != "process":
            return None
        return choose(self.device_threads, self.device_cpus, self.wait)

    def start(self, weights: dict[str, torch.Tensor] | Path | None, mode: str,
              p: Placement | None) -> tuple[DeviceHandle, Callable[[str], torch.Tensor]]:
        """Start the device in `mode` with placement `p` (`placement(mode)`: chosen once, so
        the device and the session's enclave threads agree)."""
        if p is None:
            return start_device(weights, mode, self.record_view)
        return start_device(weights, mode, self.record_view, p.device_threads,
                            list(p.device_cpus) if p.device_cpus is not None else None, p.spin_s)


class TeeSession(StepSession, DeviceViewing, EnclaveHolding):
    """The enclave's Ops over a running device: counters from both sides, the device's view, and a
    close that stops the device and wipes the enclave's secrets — and its parameters when they are
    its own (`owned`: unsealed from an artifact, not the caller's weights)."""

    ops: TeeModelOps

    def __init__(self, scheme: str, cfg: Any, ops: TeeModelOps, owned: bool,
                 placement: Placement | None = None) -> None:
        super().__init__(scheme, cfg, ops)
        self.owned = owned
        self.placement = placement

    def running(self) -> contextlib.AbstractContextManager:
        if self.placement is None:
            return contextlib.nullcontext()
        return enclave_threads(self.placement.enclave_threads)

    def counters(self) -> SplitCost:
        return self.ops.cost_counters()

    def device_view(self) -> View:
        return self.ops.device_view()

    def resident_secret_bytes(self) -> int:
        return self.ops.resident_secret_bytes()

    def _release(self) -> None:
        try:
            self.ops.close()
        finally:
            for t in self.ops.w.values() if self.owned else ():
                t.zero_()


class Wipeable(Protocol):
    def wipe(self, weights: bool = False) -> None: ...


def start_session(scheme: str, cfg: Any, options: DeviceOptions, mode: str,
                  device_weights: dict[str, torch.Tensor] | Path | None, secrets: Wipeable,
                  build: Callable[[DeviceHandle, Callable[[str], torch.Tensor]], TeeModelOps],
                  owned: bool) -> TeeSession:
    """Start the device on `device_weights`, build the enclave's Ops over it (`build`) and wrap
    them in a session. If anything fails on the way, the device is stopped and the secrets are
    wiped before the error goes on: nothing is left running or lying in memory."""
    device = None
    done = False
    try:
        placement = options.placement(mode)
        device, weight_of = options.start(device_weights, mode, placement)
        session = TeeSession(scheme, cfg, build(device, weight_of), owned, placement)
        done = True
        return session
    finally:
        if not done:
            try:
                if device is not None:
                    device.stop()
            finally:
                secrets.wipe(owned)
