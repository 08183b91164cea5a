"""The `he` server as its own OS process: `python -m veil.he.server_main SPEC` (SPEC: JSON with the
model, the inherited socket's fd and the server's settings). It opens the model, keeps its
layers, and serves the client on the socket until the client says bye or goes away.

A module nothing imports (`python -m` of an already imported module would run it twice).
"""

from __future__ import annotations

import json
import os
import socket
import sys

import torch

from veil.errors import VeilError
from veil.he.executor import Z_MAX
from veil.he.protocol import HeServer
from veil.model.opening import open_model
from veil.tee.channel import Channel


def main(argv: list[str]) -> int:
    try:
        spec = json.loads(argv[0])
        fd, model = int(spec["fd"]), str(spec["model"])
        timeout_s = float(spec["timeout_s"])
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        print(f"error: bad server spec ({exc})", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    channel = Channel(socket.socket(fileno=fd), timeout_s=timeout_s, peer="client")
    try:
        opened = open_model(model)
        server = HeServer(opened.cfg, opened.weights, channel, mask=bool(spec.get("mask", True)),
                          mask_bound=float(spec.get("mask_bound", 64.0)),
                          gs_tol=float(spec.get("gs_tol", 1e-3)), timeout_s=timeout_s,
                          z_max=float(spec.get("z_max", Z_MAX)))
        server.serve()
    except VeilError as exc:
        print(f"veil he server: {exc}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    return 0


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))
