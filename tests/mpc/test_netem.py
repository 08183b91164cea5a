"""The relay that gives the MPC benchmark its network conditions delays and limits what it says."""

import socket
import statistics
import threading
import time

import pytest

from veil.errors import ConfigError
from veil.mpc.netem import PROFILES, LinkProfile, Relay


def _server(mode):
    """A loopback server: "echo" returns every byte; "sink" counts them and answers at the end."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)

    def serve():
        c, _ = ls.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        got = 0
        while True:
            data = c.recv(1 << 16)
            if not data:
                break
            if mode == "echo":
                c.sendall(data)
            else:
                got += len(data)
                if got >= 2_000_000:
                    c.sendall(b"k")
        c.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{ls.getsockname()[1]}"


def _dial(address):
    host, port = address.split(":")
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def test_the_relay_adds_its_one_way_delay_each_way():
    with Relay(LinkProfile("t", 0.005, 0), [_server("echo")]) as relay:
        s = _dial(relay.addresses[0])
        rtts = []
        for _ in range(20):
            t0 = time.perf_counter()
            s.sendall(b"x")
            assert s.recv(1) == b"x"
            rtts.append(time.perf_counter() - t0)
        s.close()
    # there and back: two one-way delays, plus the relay's own handling
    assert 0.0099 < statistics.median(rtts) < 0.013


def test_the_relay_limits_the_rate():
    with Relay(LinkProfile("t", 0.0, 20e6), [_server("sink")]) as relay:
        s = _dial(relay.addresses[0])
        t0 = time.perf_counter()
        s.sendall(b"\0" * 2_000_000)
        assert s.recv(1) == b"k"
        took = time.perf_counter() - t0
        s.close()
        assert relay.bytes_relayed >= 2_000_000
    assert 0.78 < took < 1.0          # 2 MB at 20 Mbps: 0.8 s


def test_the_relay_dials_loopback_only_and_profiles_project():
    with pytest.raises(ConfigError, match="loopback"):
        Relay(PROFILES["lan"], ["10.0.0.1:80"])
    lan = PROFILES["lan"]
    assert lan.project(1.0, 1000, 125e6) == pytest.approx(1.0 + 0.5 + 1.0)
