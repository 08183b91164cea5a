"""The device as its own OS process, and the handle the enclave keeps on it.

`python -m veil.tee.process WEIGHTS FD [--record]`: load the masked weights (safetensors), then
serve the enclave on the inherited socket FD until it closes. The handle starts it, stops it, and
makes sure it never outlives the enclave (the socket closes when the enclave dies, and the device
exits on EOF; `stop` also terminates and reaps it, so no zombie is left).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from veil.errors import CheckpointError, ConfigError, IntegrityError, ProtocolAbort
from veil.model.zoo import file_sha256
from veil.tee.channel import Channel
from veil.tee.device import DeviceState, serve, serve_in_thread


class DeviceHandle:
    """A running device: its channel, and its state when it runs in this process."""

    def __init__(self, channel: Channel, state: DeviceState | None = None,
                 proc: subprocess.Popen | None = None, thread: threading.Thread | None = None,
                 cleanup: Path | None = None) -> None:
        self.channel, self.state, self.proc, self.thread, self.cleanup = channel, state, proc, thread, cleanup

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
        cmd = [sys.executable, "-m", "veil.tee.process", str(weights), str(theirs.fileno())]
        if record:
            cmd.append("--record")
        if threads is not None:
            cmd.append(f"--threads={int(threads)}")
        proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        if cpus is not None:
            try:
                os.sched_setaffinity(proc.pid, set(cpus))
            except (OSError, ValueError) as exc:
                proc.kill()
                proc.wait()
                raise ConfigError(f"cannot pin the device to cores {sorted(cpus)} ({exc})") from None
        handle = DeviceHandle(Channel(ours, timeout_s, "device"), proc=proc, cleanup=cleanup)
        try:
            handle.channel.call("ping")  # the device answers once its weights are loaded
        except ProtocolAbort:
            handle.stop()
            raise
        return handle

    def stop(self) -> None:
        self.channel.close()
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.cleanup is not None:
            shutil.rmtree(self.cleanup, ignore_errors=True)
            self.cleanup = None

    def __del__(self) -> None:
        self.stop()


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


def main(argv: list[str]) -> int:
    weights, fd = Path(argv[0]), int(argv[1])
    record = "--record" in argv[2:]
    for arg in argv[2:]:
        if arg.startswith("--threads="):
            torch.set_num_threads(int(arg.split("=", 1)[1]))
    # the device only answers: it waits for the enclave as long as the enclave lives, and the
    # socket's EOF (the enclave closed or died) ends it
    channel = Channel(socket.socket(fileno=fd), timeout_s=24 * 3600.0, peer="enclave")
    state = DeviceState(record=record)
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            state.tensors[key] = f.get_tensor(key)
    serve(channel, state)
    return 0


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))
