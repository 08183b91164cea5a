"""The device as its own OS process: same results, and a dying device is a clear error."""

from __future__ import annotations

import os
import signal
import time

import pytest

import veil
from veil.errors import ProtocolAbort


def test_process_device_matches_plain_and_shuts_down():
    plain = veil.load("tiny-qwen2")
    loro = veil.load("tiny-qwen2", scheme="loro", device="process", verify=True, record_view=True)
    assert loro.generate([4, 5, 6], max_new_tokens=12).token_ids == \
        plain.generate([4, 5, 6], max_new_tokens=12).token_ids
    view = loro.device_view()
    assert "kv_cache.k" in view.resident and view.received
    proc = loro.ops.device.proc
    loro.ops.close()
    assert proc.poll() is not None, "the device process must not outlive the enclave"


def test_device_killed_mid_generation_is_a_clear_error():
    loro = veil.load("tiny-llama", scheme="loro", device="process")
    proc = loro.ops.device.proc
    state = {"n": 0}
    protocol = loro.ops.protocol
    original = protocol.precompute

    def kill_on_tenth(name, x, ctx, fetched):
        state["n"] += 1
        if state["n"] == 10:
            os.kill(proc.pid, signal.SIGKILL)
        return original(name, x, ctx, fetched)

    protocol.precompute = kill_on_tenth
    t0 = time.monotonic()
    with pytest.raises(ProtocolAbort, match="device"):
        loro.generate([1, 2, 3], max_new_tokens=16)
    assert time.monotonic() - t0 < 5
    loro.ops.close()
    assert proc.poll() == -signal.SIGKILL   # reaped: no zombie
