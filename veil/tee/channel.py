"""A framed, counted channel over a connected socket (the enclave ↔ device boundary).

Both in-process tests (a socketpair, the device served by a thread) and real runs (one OS process
per side) use this class, so byte and round-trip counts are the same in both. Requests may be
pipelined: `send` several, do other work, then `recv` the replies in order — that is how the
enclave overlaps its own work with the device's.
"""

from __future__ import annotations

import copy
import socket
import struct
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from veil.errors import ProtocolAbort
from veil.tee.wire import PREFIX, Message, encode, parse_header, parse_prefix, tensors_from

ERROR_OP = "error"


@dataclass
class ChannelStats:
    """Traffic in each direction; `round_trips` counts replies received (request → reply pairs)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    round_trips: int = 0
    wait_s: float = 0.0          # time spent blocked waiting for the peer's messages
    bytes_by_op: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def snapshot(self) -> dict[str, int]:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "messages_sent": self.messages_sent, "round_trips": self.round_trips,
                "wait_s": self.wait_s}


class Channel:
    """Messages over one stream socket, with a receive timeout so a dead or stalled peer ends the
    run with `ProtocolAbort` instead of a hang.

    The timeout is the kernel's (SO_RCVTIMEO / SO_SNDTIMEO on a blocking socket), not Python's:
    a Python timeout polls before every read, one more system call per read. `spin_s`: how long a
    read busy-polls (non-blocking reads) before it blocks. When each side has a core of its own,
    spinning turns a ~60 µs sleep-and-wake handoff into ~4 µs (measured on this repo's CI
    machine; veil/tee/placement.py decides); on a shared core it would only steal the peer's
    time, so 0 (block at once) is the default."""

    def __init__(self, sock: socket.socket, timeout_s: float = 30.0, peer: str = "peer",
                 spin_s: float = 0.0) -> None:
        self.sock = sock
        self.sock.settimeout(None)
        self.set_timeout(timeout_s)
        self.peer = peer
        self.spin_s = spin_s
        self.stats = ChannelStats()
        self._pending = bytearray()

    def set_timeout(self, timeout_s: float) -> None:
        """How long a read or a send may wait for the peer before the run is aborted."""
        sec = int(timeout_s)
        usec = int((timeout_s - sec) * 1e6)
        tv = struct.pack("ll", sec, usec if sec or usec else 1)    # (0, 0) would mean "never"
        for opt in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            self.sock.setsockopt(socket.SOL_SOCKET, opt, tv)
        self.timeout_s = timeout_s

    _CHUNK = 1 << 16

    def send(self, msg: Message) -> None:
        frame = encode(msg)
        try:
            self.sock.sendall(frame)
        except BlockingIOError:
            raise ProtocolAbort(f"{self.peer} stalled: it took no {msg.op!r} within "
                                f"{self.timeout_s:g} s") from None
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise ProtocolAbort(f"{self.peer} is gone: sending {msg.op!r} failed ({exc})") from None
        self.stats.bytes_sent += len(frame)
        self.stats.messages_sent += 1
        self.stats.bytes_by_op[msg.op] += len(frame)

    def _recv_into(self, view: memoryview, what: str, partial: bool) -> int:
        try:
            k = self._spin_into(view) if self.spin_s > 0 else None
            if k is None:
                k = self.sock.recv_into(view)
        except (BlockingIOError, socket.timeout):    # SO_RCVTIMEO ran out
            raise ProtocolAbort(f"{self.peer} stalled: no {what} within {self.timeout_s:g} s") from None
        except (ConnectionResetError, OSError) as exc:
            raise ProtocolAbort(f"{self.peer} is gone while reading {what} ({exc})") from None
        if k == 0:
            raise ProtocolAbort(f"{self.peer} closed the connection"
                                + (f" in the middle of a {what}" if partial else ""))
        return k

    def _spin_into(self, view: memoryview) -> int | None:
        """Non-blocking reads for up to `spin_s`; None if nothing came (then block)."""
        deadline = time.perf_counter() + self.spin_s
        while True:
            for _ in range(64):
                try:
                    return self.sock.recv_into(view, 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
            if time.perf_counter() > deadline:
                return None

    def _read(self, n: int, what: str) -> bytearray:
        """Exactly n bytes, as a fresh buffer (tensors are made over it without a copy). A small
        read asks the socket for up to 64 KiB at once and keeps the surplus: a prefix, header and
        small payload then cost one system call."""
        out = bytearray(n)
        got = min(n, len(self._pending))
        if got:
            out[:got] = self._pending[:got]
            del self._pending[:got]
        view = memoryview(out)
        while got < n:
            if n - got < self._CHUNK:
                scratch = bytearray(self._CHUNK)
                k = self._recv_into(memoryview(scratch), what, got > 0)
                use = min(k, n - got)
                view[got:got + use] = scratch[:use]
                self._pending += scratch[use:k]
                got += use
            else:
                got += self._recv_into(view[got:], what, got > 0)
        return out

    def recv(self) -> Message:
        """The next message; a peer's error report is raised here as `ProtocolAbort`."""
        t0 = time.perf_counter()
        prefix = self._read(PREFIX.size, "message")
        self.stats.wait_s += time.perf_counter() - t0
        header_len = parse_prefix(bytes(prefix))
        header, specs = parse_header(bytes(self._read(header_len, "header")))
        payload = self._read(sum(n for _, _, n in specs), "payload")
        self.stats.bytes_received += PREFIX.size + header_len + len(payload)
        msg = Message(header["op"], header["args"], tensors_from(payload, specs))
        if msg.op == ERROR_OP:
            raise ProtocolAbort(f"{self.peer} reported: {msg.args.get('message', 'unknown error')}")
        return msg

    def reply(self) -> Message:
        """Receive the reply to an earlier request (counted as one round trip)."""
        msg = self.recv()
        self.stats.round_trips += 1
        return msg

    def call(self, op: str, tensors: list[torch.Tensor] | None = None, **args) -> Message:
        """One request and its reply."""
        self.send(Message(op, args, tensors or []))
        return self.reply()

    def call_uncounted(self, op: str, tensors: list[torch.Tensor] | None = None, **args) -> Message:
        """A request that must not count as online traffic: bookkeeping (the peer's own counters)
        or offline work the caller accounts for itself."""
        saved = copy.deepcopy(self.stats)
        try:
            return self.call(op, tensors, **args)
        finally:
            self.stats = saved

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
