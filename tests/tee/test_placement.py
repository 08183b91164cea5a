"""Where the enclave and a device process run: the rule (veil/tee/placement.py), the options that
override it, and the channel's busy-poll."""

import socket
import threading
import time

import pytest
import torch

import veil
from veil.errors import ConfigError, ProtocolAbort
from veil.tee.channel import Channel
from veil.tee.placement import SPIN_S, choose, enclave_threads
from veil.tee.wire import Message


def test_one_core_shares_it_and_blocks():
    p = choose(cpus=[0])
    assert (p.enclave_threads, p.device_threads, p.device_cpus, p.spin_s) == (1, 1, None, 0.0)


def test_two_or_more_cores_give_the_device_the_others_and_spin():
    assert choose(cpus=[0, 1]) == choose(cpus=[0, 1], wait="auto")
    p = choose(cpus=[0, 1])
    assert (p.enclave_threads, p.device_threads, p.device_cpus, p.spin_s) == (1, 1, (1,), SPIN_S)
    p = choose(cpus=[2, 3, 5, 7])
    assert (p.device_threads, p.device_cpus) == (3, (3, 5, 7))


def test_explicit_choices_win_and_spinning_needs_a_core_of_its_own():
    # every core for the device threads: the enclave has none left, so nobody spins
    assert choose(device_threads=2, cpus=[0, 1]).spin_s == 0.0
    assert choose(device_threads=1, cpus=[0, 1]).spin_s == SPIN_S
    assert choose(device_cpus=(0, 1), cpus=[0, 1]).spin_s == 0.0
    # the benchmark's layout: this process pinned to core 0, the device to core 1
    assert choose(device_cpus=(1,), cpus=[0]).spin_s == SPIN_S
    assert choose(cpus=[0, 1], wait="block").spin_s == 0.0
    assert choose(cpus=[0], wait="spin").spin_s == SPIN_S
    with pytest.raises(ConfigError, match="wait"):
        choose(wait="sometimes")


def test_wait_is_an_option_of_a_device_process_only():
    with pytest.raises(ConfigError, match="need device='process'"):
        veil.load("tiny-llama", scheme="loro", device="thread", wait="spin")
    with pytest.raises(ConfigError, match="wait"):
        veil.load("tiny-llama", scheme="loro", device="process", wait="sometimes")


def test_enclave_threads_restore_the_callers_count():
    before = torch.get_num_threads()
    with enclave_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_a_session_runs_with_its_placement_and_gives_the_threads_back():
    before = torch.get_num_threads()
    with veil.load("tiny-llama", scheme="loro", device="process") as m:
        assert m.session.placement is not None
        seen = []
        linears = m.ops.linears

        def spy(*a, **k):
            seen.append(torch.get_num_threads())
            return linears(*a, **k)

        m.ops.linears = spy
        with veil.load("tiny-llama") as plain:
            want = plain.generate([1, 2, 3], max_new_tokens=6).token_ids
        assert m.generate([1, 2, 3], max_new_tokens=6).token_ids == want
        assert set(seen) == {m.session.placement.enclave_threads}
        assert torch.get_num_threads() == before


def _pair(spin_s, timeout_s=5.0):
    a, b = socket.socketpair()
    return Channel(a, timeout_s, "device", spin_s), Channel(b, timeout_s, "enclave", spin_s)


def test_spinning_channels_carry_messages_both_ways():
    ours, theirs = _pair(SPIN_S)

    def echo():
        for _ in range(50):
            msg = theirs.recv()
            theirs.send(Message("echo", msg.args, [t * 2 for t in msg.tensors]))

    th = threading.Thread(target=echo)
    th.start()
    for i in range(50):
        x = torch.randn(3, 7)
        got = ours.call("x", [x], i=i)
        assert got.args == {"i": i} and torch.equal(got.tensors[0], x * 2)
    th.join()


def test_a_spinning_reader_still_times_out():
    ours, _theirs = _pair(0.05, timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(ProtocolAbort, match="stalled"):
        ours.recv()
    assert time.monotonic() - t0 < 2
