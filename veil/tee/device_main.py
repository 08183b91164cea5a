"""The untrusted device as its own OS process:
`python -m veil.tee.device_main WEIGHTS FD [--record] [--threads=N]` loads the masked weights
(safetensors), then serves the enclave on the inherited socket FD until it closes.

A module of its own, imported by nothing: `python -m` of a module that the package's own imports
already loaded would run it twice (runpy warns about exactly that).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from veil.tee.channel import Channel
from veil.tee.device import DeviceState, serve


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
