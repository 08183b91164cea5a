"""The enclave↔device wire: round trips, counts, and every way a peer can misbehave."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from veil.errors import ProtocolAbort
from veil.tee.channel import Channel
from veil.tee.wire import PREFIX, Message, decode, encode


def test_frame_round_trip_all_dtypes():
    tensors = [torch.randn(3, 4), torch.arange(6).reshape(2, 3), torch.tensor([True, False]),
               torch.zeros(0, 5), torch.randn(2, dtype=torch.float64)]
    back = decode(encode(Message("linear", {"name": "layers.0.attn.q", "k": 3}, tensors)))
    assert back.op == "linear" and back.args == {"name": "layers.0.attn.q", "k": 3}
    for a, b in zip(tensors, back.tensors):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("mangle, match", [
    (lambda f: b"XXXX" + f[4:], "bad magic"),
    (lambda f: f[:4] + bytes([9]) + f[5:], "wire version 9"),
    (lambda f: f[:-3], "payload has"),
    (lambda f: f[:PREFIX.size] + b"{" * (len(f) - PREFIX.size), "malformed header"),
    (lambda f: f[:8], "truncated"),
])
def test_garbage_frames_raise_protocol_abort(mangle, match):
    frame = encode(Message("op", {}, [torch.ones(4)]))
    with pytest.raises(ProtocolAbort, match=match):
        decode(mangle(frame))


def test_hostile_tensor_description_refused():
    import json

    header = json.dumps({"op": "x", "args": {}, "tensors": [{"dtype": "object", "shape": [1]}]}).encode()
    with pytest.raises(ProtocolAbort, match="invalid tensor description"):
        decode(PREFIX.pack(b"VEIL", 1, len(header)) + header)
    header = json.dumps({"op": "x", "args": {}, "tensors": [{"dtype": "float32", "shape": [1 << 31, 8]}]}).encode()
    with pytest.raises(ProtocolAbort, match="payload bytes"):
        decode(PREFIX.pack(b"VEIL", 1, len(header)) + header)


def _echo_server(sock: socket.socket) -> None:
    ch = Channel(sock, timeout_s=5, peer="enclave")
    try:
        while True:
            msg = ch.recv()
            ch.send(Message(msg.op, msg.args, [t * 2 for t in msg.tensors]))
    except ProtocolAbort:
        pass


def test_counts_bytes_and_round_trips():
    a, b = socket.socketpair()
    threading.Thread(target=_echo_server, args=(b,), daemon=True).start()
    ch = Channel(a, timeout_s=5, peer="device")
    x = torch.randn(2, 8)
    # pipelined: two requests in flight, then both replies
    ch.send(Message("double", {}, [x]))
    ch.send(Message("double", {}, [x + 1]))
    r1, r2 = ch.reply(), ch.reply()
    assert torch.equal(r1.tensors[0], 2 * x) and torch.equal(r2.tensors[0], 2 * (x + 1))
    frame = len(encode(Message("double", {}, [x])))
    assert ch.stats.round_trips == 2 and ch.stats.bytes_sent == 2 * frame
    assert ch.stats.bytes_received == 2 * frame
    ch.close()


def test_coalesced_and_large_frames_arrive_whole():
    """Several frames in one socket read, and a frame larger than the read size, both decode."""
    a, b = socket.socketpair()
    sender = Channel(b, timeout_s=5)
    ch = Channel(a, timeout_s=5)
    big = torch.randn(300, 1000)                       # 1.2 MB: many reads
    small = [torch.arange(i + 1) for i in range(5)]
    threading.Thread(target=lambda: [sender.send(Message("t", {"i": i}, [t]))
                                     for i, t in enumerate([*small, big, *small])],
                     daemon=True).start()
    got = [ch.recv() for _ in range(11)]
    assert [m.args["i"] for m in got] == list(range(11))
    assert torch.equal(got[5].tensors[0], big) and torch.equal(got[10].tensors[0], small[4])
    got[5].tensors[0].add_(1)                          # received tensors are writable, not shared
    assert torch.equal(got[6].tensors[0], small[0])
    ch.close(), sender.close()


def test_bookkeeping_call_is_not_counted_and_waits_are_timed():
    a, b = socket.socketpair()
    threading.Thread(target=_echo_server, args=(b,), daemon=True).start()
    ch = Channel(a, timeout_s=5, peer="device")
    ch.call("double", [torch.ones(3)])
    before = ch.stats.snapshot()
    assert ch.call_uncounted("double", k=1).op == "double"
    assert ch.stats.snapshot() == before
    assert before["wait_s"] >= 0


def test_stalled_peer_times_out():
    a, b = socket.socketpair()
    ch = Channel(a, timeout_s=0.3, peer="device")
    t0 = time.monotonic()
    with pytest.raises(ProtocolAbort, match="device stalled"):
        ch.call("anything")
    assert time.monotonic() - t0 < 2
    b.close()


def test_peer_process_dying_mid_reply_is_a_clear_error():
    a, b = socket.socketpair()
    # a device process that reads the request, writes half a reply frame and dies
    code = ("import os, socket, sys\n"
            "s = socket.socket(fileno=int(sys.argv[1]))\n"
            "s.recv(1 << 16)\n"
            "s.sendall(b'VEIL\\x01' + (200).to_bytes(4, 'little') + b'{\"op\":')\n"
            "os._exit(3)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(b.fileno())], pass_fds=[b.fileno()])
    b.close()
    ch = Channel(a, timeout_s=10, peer="device")
    t0 = time.monotonic()
    with pytest.raises(ProtocolAbort, match="device closed the connection in the middle"):
        ch.call("linear", [torch.ones(3)])
    assert time.monotonic() - t0 < 5
    assert proc.wait(timeout=5) == 3


def test_peer_error_report_is_raised():
    a, b = socket.socketpair()
    peer = Channel(b, timeout_s=5)
    ch = Channel(a, timeout_s=5, peer="device")
    peer.send(Message("error", {"message": "unknown op 'frobnicate'"}))
    with pytest.raises(ProtocolAbort, match="device reported: unknown op 'frobnicate'"):
        ch.recv()
