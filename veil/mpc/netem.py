"""A delaying, rate-limiting TCP relay: network conditions for parties that run on one machine.

The MPC benchmark's ratio depends on latency and bandwidth (vanilla needs ~18× MERGE's rounds), and
this kernel has no `netem` qdisc. So the parties talk through this relay: each party listens on its
own loopback port and reaches its peer through a relay port; every byte is held for the profile's
one-way delay after the last bit of its chunk has crossed a link of the profile's rate (store and
forward, a token bucket of one chunk). Only 127.0.0.1 is ever bound or dialled.

Threads, not asyncio: asyncio's epoll loop rounds every timer up to the next millisecond, which
would double the LAN profile's 0.5 ms; a sleeping writer thread keeps ~0.1 ms here (measured in
tests/mpc/test_netem.py) without spinning on the cores the parties need.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from dataclasses import dataclass

from veil.errors import ConfigError

_CHUNK = 1 << 16


@dataclass(frozen=True)
class LinkProfile:
    """One direction of a link: its one-way delay and its rate (bits/s; 0 = unlimited)."""

    name: str
    one_way_s: float
    rate_bps: float

    def __post_init__(self) -> None:
        if self.one_way_s < 0 or self.rate_bps < 0:
            raise ConfigError(f"link profile {self.name!r}: delay and rate must be ≥ 0")

    def describe(self) -> str:
        rate = f"{self.rate_bps / 1e9:g} Gbps" if self.rate_bps >= 1e9 else f"{self.rate_bps / 1e6:g} Mbps"
        return f"{self.name}: {rate}, {self.one_way_s * 1e3:g} ms one way"

    def project(self, seconds: float, rounds: float, busier_bytes: float) -> float:
        """A run measured on loopback (`seconds`, with `rounds` sequential send actions of the
        busier party and its `busier_bytes`) projected onto this link: each round waits one
        one-way delay (both parties send at once), and the busier party's bytes cross at the
        rate."""
        wire = busier_bytes * 8 / self.rate_bps if self.rate_bps else 0.0
        return seconds + rounds * self.one_way_s + wire


PROFILES = {"lan": LinkProfile("lan", 0.0005, 1e9), "wan": LinkProfile("wan", 0.020, 100e6)}


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        raise ConfigError(f"the relay only connects loopback addresses, not {address!r}")
    return "127.0.0.1", int(port)


class _Direction:
    """src → dst with the profile's delay and rate: a reader stamps each chunk with its release
    time, a writer sleeps until then and sends it."""

    def __init__(self, src: socket.socket, dst: socket.socket, link: LinkProfile,
                 counter: list[int]) -> None:
        self.src, self.dst, self.link, self.counter = src, dst, link, counter
        self.q: queue.Queue = queue.Queue()
        self.threads = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._write, daemon=True)]
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        free_at = 0.0                       # when the link has sent everything queued so far
        while True:
            try:
                data = self.src.recv(_CHUNK)
            except OSError:
                data = b""
            now = time.perf_counter()
            if not data:
                self.q.put((max(free_at, now) + self.link.one_way_s, None))
                return
            wire = len(data) * 8 / self.link.rate_bps if self.link.rate_bps else 0.0
            free_at = max(free_at, now) + wire
            self.q.put((free_at + self.link.one_way_s, data))

    def _write(self) -> None:
        while True:
            release, data = self.q.get()
            wait = release - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            if data is None:
                try:
                    self.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                self.dst.sendall(data)
            except OSError:
                return
            self.counter[0] += len(data)


class Relay:
    """One relay port per target address: a connection to `addresses[i]` (127.0.0.1:port)
    reaches `targets[i]` through the profile's link, both directions alike. `bytes_relayed`:
    everything forwarded so far."""

    def __init__(self, link: LinkProfile, targets: list[str]) -> None:
        self.link = link
        self.targets = [_host_port(t) for t in targets]
        self.counter = [0]
        self._socks: list[socket.socket] = []
        self._closed = False
        self.addresses: list[str] = []
        for target in self.targets:
            ls = socket.socket()
            ls.bind(("127.0.0.1", 0))
            ls.listen(16)
            self._socks.append(ls)
            self.addresses.append(f"127.0.0.1:{ls.getsockname()[1]}")
            threading.Thread(target=self._accept, args=(ls, target), daemon=True).start()

    @property
    def bytes_relayed(self) -> int:
        return self.counter[0]

    def _accept(self, ls: socket.socket, target: tuple[str, int]) -> None:
        while not self._closed:
            try:
                a, _ = ls.accept()
            except OSError:
                return
            try:
                b = self._dial(target)
            except OSError:
                a.close()
                continue
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._socks.append(s)
            _Direction(a, b, self.link, self.counter)
            _Direction(b, a, self.link, self.counter)

    def _dial(self, target: tuple[str, int], wait_s: float = 30.0) -> socket.socket:
        """The target may not listen yet (its party is still starting): retry for a while."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                s = socket.create_connection(target, timeout=wait_s)
                s.settimeout(None)          # an idle party is not a dead one
                return s
            except OSError:
                if time.monotonic() > deadline or self._closed:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self._closed = True
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
