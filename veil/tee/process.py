"""The device as its own OS process, and the handle the enclave keeps on it.

The device process is `python -m veil.tee.device_main WEIGHTS FD [--record] [--threads=N]`
(veil/tee/device_main.py). The handle starts it, stops it, and makes sure it never outlives the
enclave (the socket closes when the enclave dies, and the device exits on EOF; `stop` also waits
for it and kills it after a bound, so no zombie is left).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from veil.errors import CheckpointError, ConfigError, IntegrityError, ProtocolAbort
from veil.model.zoo import file_sha256
from veil.tee.channel import Channel
from veil.tee.device import DeviceState, serve_in_thread


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
                   cpus: list[int] | None = None) -> "DeviceHandle":
        """Start the device process. threads: its torch thread count (default: torch's choice;
        on a machine shared with the enclave, 1 keeps the two from fighting over cores).
        cpus: the cores it may run on (benchmarks give enclave and device a core each)."""
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "veil.tee.device_main", str(weights), str(theirs.fileno())]
        if record:
            cmd.append("--record")
        if threads is not None:
            cmd.append(f"--threads={int(threads)}")
        proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        handle = DeviceHandle(Channel(ours, timeout_s, "device"), proc=proc, cleanup=cleanup)
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
    Freivalds vectors), checked against a digest the enclave trusts when one is given."""

    def __init__(self, path: Path, sha256: str | None = None) -> None:
        self.path = Path(path)
        if sha256 is not None and file_sha256(self.path) != sha256:
            raise IntegrityError(f"{self.path}: the device weights differ from the ones sealed "
                                 "with this artifact (tampered or replaced)")
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{self.path}: unreadable device weights ({exc})") from None

    def weight(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(f"{name}.weight")
