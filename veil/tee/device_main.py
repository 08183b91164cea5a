"""The untrusted device as its own OS process: `python -m veil.tee.device_main SPEC`, SPEC a
`DeviceSpec` as JSON. It loads the masked weights (safetensors), then serves the enclave on the
inherited socket until it closes.

A module of its own that nothing imports: `python -m` of a module that the package's own imports
already loaded would run it twice (runpy warns about exactly that).
"""

from __future__ import annotations

import os
import socket
import sys

import torch
from safetensors import safe_open

from veil.errors import ConfigError
from veil.tee.channel import Channel
from veil.tee.device import ENCLAVE_WAIT_S, DeviceState, serve
from veil.tee.process import DeviceSpec


def main(argv: list[str]) -> int:
    try:
        spec = DeviceSpec.parse(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    channel = Channel(socket.socket(fileno=spec.fd), timeout_s=ENCLAVE_WAIT_S, peer="enclave",
                      spin_s=spec.spin_s)
    state = DeviceState(record=spec.record)
    with safe_open(spec.weights, framework="pt") as f:
        for key in f.keys():
            state.tensors[key] = f.get_tensor(key)
    serve(channel, state)
    return 0


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))
