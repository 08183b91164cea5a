"""Where the enclave and a device process run on this machine: torch threads, cores, wait policy.

Left to themselves, both processes start one torch thread per core and fight over the cores, and
every request pays a sleep-and-wake handoff: measured on the 2-core CI machine, the default model
under `loro` with its device as a process decoded at 1.2 tok/s (plain: 38). The rule here:

- one core: both sides on it, one torch thread each, blocking waits (a spinning reader would
  only steal the time its peer needs);
- two or more: the enclave keeps one torch thread (its work per request is small — norms, pads,
  a rank-r correction — and mostly overlaps the device's), the device gets the other cores, pinned
  there with one torch thread per core, and both sides busy-poll the channel briefly before
  blocking (`SPIN_S`), which turns each ~60 µs handoff into a few µs.

A user's explicit `device_threads` / `device_cpus` / `wait` win over the rule. The enclave's
thread count applies only while the session runs (`enclave_threads`), so a caller's own torch
work keeps its threads.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from veil.errors import ConfigError

# how long a channel read busy-polls before it blocks: longer than the enclave's work between two
# requests and most device matmuls (a decode step's largest, the LM head, takes ~10 ms on one core
# here), short enough that an idle session stops burning its cores at once
SPIN_S = 0.02


@dataclass(frozen=True)
class Placement:
    enclave_threads: int
    device_threads: int
    device_cpus: tuple[int, ...] | None
    spin_s: float

    def describe(self) -> str:
        cores = (f"cores {','.join(map(str, self.device_cpus))}" if self.device_cpus is not None
                 else "any core")
        wait = f"spin {self.spin_s * 1e3:g} ms, then block" if self.spin_s else "block"
        return (f"enclave {self.enclave_threads} thread(s); device {self.device_threads} "
                f"thread(s) on {cores}; waits: {wait}")


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def choose(device_threads: int | None = None, device_cpus: tuple[int, ...] | None = None,
           wait: str = "auto", cpus: list[int] | None = None) -> Placement:
    """The placement for a device process beside an enclave that may run on `cpus` (default:
    the cores this process may use)."""
    cpus = available_cpus() if cpus is None else cpus
    if wait not in ("auto", "spin", "block"):
        raise ConfigError(f"option 'wait' must be 'auto', 'spin' or 'block', got {wait!r}")
    if device_cpus is not None:
        pinned: tuple[int, ...] | None = tuple(device_cpus)
    elif device_threads is None and len(cpus) >= 2:
        pinned = tuple(cpus[1:])
    else:
        pinned = None
    threads = device_threads or (len(pinned) if pinned is not None else 1)
    # does the enclave keep a core the device's threads leave alone?
    if pinned is not None:
        own = bool(set(cpus) - set(pinned))
    else:
        own = threads < len(cpus)
    spin = {"spin": True, "block": False}.get(wait, own)
    return Placement(1, threads, pinned, SPIN_S if spin else 0.0)


# below this, a device process costs more to start (writing the masked weights, a new interpreter)
# than it saves; the tiny presets stay in-thread
PROCESS_MIN_BYTES = 64 << 20


def process_pays(weights: Any) -> bool:
    """Whether `veil.load` should run a device as its own process rather than a thread: with two
    or more cores and a model of PROCESS_MIN_BYTES or more. A thread device shares the enclave's
    interpreter lock and torch thread pool — measured on the default model here at 7.0 tok/s
    against 12.5 for a process (and it slows a plain model in the same process by half while it
    lives: benchmarks/results/tee.md)."""
    if len(available_cpus()) < 2:
        return False
    return sum(t.nbytes for t in weights.values()) >= PROCESS_MIN_BYTES


@contextlib.contextmanager
def enclave_threads(n: int) -> Iterator[None]:
    """Run the enclosed work with `n` torch threads, then restore the caller's count."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
