"""The device as its own OS process, and the handle the enclave keeps on it.

The device process is `python -m veil.tee.device_main SPEC` (veil/tee/device_main.py). The handle starts it, stops it, and makes sure it never outlives the
enclave (the socket closes when the enclave dies, and the device exits on EOF; `stop` also waits
for it and kills it after a bound, so no zombie is left).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load

from veil.errors import CheckpointError, ConfigError, IntegrityError, ProtocolAbort
from veil.tee.channel import Channel
from veil.tee.device import DeviceState, serve_in_thread


@dataclass(frozen=True)
class DeviceSpec:
    """What the device process is started with."""

    weights: str                 # safetensors file of what the device may hold
    fd: int                      # the inherited socket to the enclave
    record: bool = False         # keep everything received (the device view)
    threads: int | None = None   # torch threads (None: torch's choice)
    spin_s: float = 0.0          # the channel's busy-poll before it blocks (veil/tee/placement.py)

    def __post_init__(self) -> None:
        ok = (isinstance(self.weights, str) and isinstance(self.fd, int) and self.fd >= 0
              and isinstance(self.record, bool)
              and (self.threads is None or (isinstance(self.threads, int) and self.threads >= 1))
              and isinstance(self.spin_s, (int, float)) and 0 <= self.spin_s <= 1)
        if not ok:
            raise ConfigError(f"malformed device spec {asdict(self)}")

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "veil.tee.device_main", json.dumps(asdict(self))]

    @staticmethod
    def parse(argv: list[str]) -> "DeviceSpec":
        try:
            (text,) = argv
            return DeviceSpec(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"the device process takes one argument, its spec as JSON ({exc})") \
                from None


class DeviceHandle:
    """A running device: its channel, and its state when it runs in this process. `stop` (or, if
    nobody calls it, a finaliser that runs before interpreter teardown) closes the channel, then
    joins the device's thread or waits for its process — killing it after a bound — and removes
    its scratch folder."""

    def __init__(self, channel: Channel, state: DeviceState | None = None,
                 proc: subprocess.Popen | None = None, thread: threading.Thread | None = None,
                 cleanup: Path | None = None) -> None:
        self.channel, self.state, self.proc, self.thread = channel, state, proc, thread
        # the finaliser holds what it must release, never the handle itself
        self._stop = weakref.finalize(self, _release, channel, proc, thread, cleanup)

    @staticmethod
    def in_thread(weights: dict[str, torch.Tensor], record: bool) -> "DeviceHandle":
        state = DeviceState(record=record)
        state.tensors.update(weights)
        channel, thread = serve_in_thread(state)
        return DeviceHandle(channel, state=state, thread=thread)

    @staticmethod
    def in_process(weights: Path, record: bool, cleanup: Path | None = None,
                   timeout_s: float = 60.0, threads: int | None = None,
                   cpus: list[int] | None = None, spin_s: float = 0.0) -> "DeviceHandle":
        """Start the device process. threads: its torch thread count (default: torch's choice);
        cpus: the cores it may run on; spin_s: both ends' busy-poll before a read blocks
        (veil/tee/placement.py chooses all three for the machine)."""
        ours, theirs = socket.socketpair()
        cmd = DeviceSpec(str(weights), theirs.fileno(), record, threads, spin_s).argv()
        try:
            proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            if cleanup is not None:
                shutil.rmtree(cleanup, ignore_errors=True)
            raise ConfigError(f"cannot start the device process ({exc})") from None
        finally:
            theirs.close()
        handle = DeviceHandle(Channel(ours, timeout_s, "device", spin_s), proc=proc,
                              cleanup=cleanup)
        if cpus is not None:
            try:
                os.sched_setaffinity(proc.pid, set(cpus))
            except (OSError, ValueError) as exc:
                handle.stop()
                raise ConfigError(f"cannot pin the device to cores {sorted(cpus)} ({exc})") from None
        try:
            handle.channel.call("ping")  # the device answers once its weights are loaded
        except ProtocolAbort:
            handle.stop()
            raise
        return handle

    def stop(self) -> None:
        """Idempotent."""
        self._stop()


def _release(channel: Channel, proc: subprocess.Popen | None, thread: threading.Thread | None,
             cleanup: Path | None, wait_s: float = 5.0) -> None:
    channel.close()               # the device sees EOF and returns from its serve loop
    if thread is not None:
        thread.join(wait_s)
    if proc is not None:
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=wait_s)
    if cleanup is not None:
        shutil.rmtree(cleanup, ignore_errors=True)


class SafetensorsReader:
    """The enclave's read access to the device's masked weights (for offline pad products and
    Freivalds vectors). With a digest the enclave trusts, the file is read once into enclave
    memory and the digest is checked on exactly those bytes: the device controls the file, so a
    check followed by a second read (a memory map) would let it swap the file in between."""

    def __init__(self, path: Path, sha256: str | None = None) -> None:
        self.path = Path(path)
        try:
            if sha256 is None:
                self._file = safe_open(str(self.path), framework="pt")
                self.weight = self._mapped
                return
            data = self.path.read_bytes()
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{self.path}: unreadable device weights ({exc})") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"{self.path}: the device weights differ from the ones sealed "
                                 "with this artifact (tampered or replaced)")
        try:
            self._tensors = load(data)
        except SafetensorError as exc:
            raise CheckpointError(f"{self.path}: unreadable device weights ({exc})") from None
        self.weight = self._held

    def _mapped(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(f"{name}.weight")

    def _held(self, name: str) -> torch.Tensor:
        return self._tensors[f"{name}.weight"]
