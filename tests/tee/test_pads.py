"""LoRO's pad store: pads regenerated from keystream, products sealed on the device and fetched
with the request that uses them; a device that alters, swaps or replays them is caught."""

from __future__ import annotations

import pytest
import torch

import veil
from veil.tee.pads import PadStream


def test_pad_stream_is_deterministic_gaussian_and_keyed():
    s = PadStream()
    whole = s.rows(1, 3, 0, 40, 97)
    assert whole.shape == (40, 97) and whole.dtype == torch.float32
    assert torch.equal(s.rows(1, 3, 10, 5, 97), whole[10:15])       # any slice regenerates
    assert not torch.equal(s.rows(2, 3, 0, 40, 97), whole)          # new epoch, new pads
    assert not torch.equal(s.rows(1, 4, 0, 40, 97), whole)          # per group
    assert not torch.equal(PadStream().rows(1, 3, 0, 40, 97), whole)  # per key
    # a decode step's rows of every group in one pass are the same rows, group by group
    import numpy as np
    dims, starts = np.array([97, 576, 1536]), np.array([4, 0, 9])
    for k, seg in enumerate(s.segments(1, np.array([3, 5, 8]), starts, 2, dims)):
        assert torch.equal(seg, s.rows(1, [3, 5, 8][k], int(starts[k]), 2, int(dims[k])))
    big = s.rows(1, 0, 0, 200, 576)
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02


def test_pad_products_live_on_the_device_not_in_the_enclave():
    loro = veil.load("tiny-llama", scheme="loro")
    cost = loro.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True).cost
    pool = loro.ops.pool
    assert pool.nbytes() == 64                                       # two keys
    stored = sum(t.nbytes for k, t in loro.device_view().resident.items() if k.startswith("pads."))
    assert stored == pool.cost.stored_bytes // pool.cost.rows * pool.capacity > 0
    assert cost.split.pad_bytes_used > 0
    # fetched with the linear requests: no round trip added (see test_round_trips_per_decode_step)


def _tamper(loro, how):
    """The 7th fetching linear: the device alters the pad rows it sends ahead of its result."""
    state = loro.ops.device_state
    honest = state._op_linear
    calls = {"n": 0}

    def evil(msg):
        calls["n"] += 1
        send = state._early
        if calls["n"] == 7 and "fetch" in msg.args and send is not None:
            def altered(early):
                blob = early.tensors[0]
                if how == "flip":
                    blob = blob.clone()
                    blob[0, 5] ^= 1
                elif how == "swap-row":
                    start, n = msg.args["fetch"]
                    blob = state.tensors[f"pads.{msg.args['names'][0]}"][start + 1:start + 1 + n]
                elif how == "drop":
                    early.tensors = early.tensors[:-1]
                    return send(early)
                early.tensors[0] = blob
                send(early)
            state._early = altered
        return honest(msg)

    state._op_linear = evil


@pytest.mark.parametrize("how", ["flip", "swap-row"])
def test_tampered_pad_products_are_refused(how):
    loro = veil.load("tiny-llama", scheme="loro")
    _tamper(loro, how)
    with pytest.raises(veil.IntegrityError, match="pad product .* failed authentication"):
        loro.generate([1, 2, 3], max_new_tokens=4)


def test_missing_pad_products_are_refused():
    loro = veil.load("tiny-llama", scheme="loro")
    _tamper(loro, "drop")
    with pytest.raises(veil.ProtocolAbort, match="expected"):
        loro.generate([1, 2, 3], max_new_tokens=4)


def test_replayed_store_from_an_earlier_generation_is_refused():
    loro = veil.load("tiny-llama", scheme="loro")
    loro.generate([1, 2, 3], max_new_tokens=4)
    state = loro.ops.device_state
    old = {k: t.clone() for k, t in state.tensors.items() if k.startswith("pads.")}
    honest = state._op_stash

    def replay(msg):
        reply = honest(msg)
        for k, t in old.items():             # the device keeps serving the old epoch's blobs
            if state.tensors[k].shape == t.shape:
                state.tensors[k] = t
        return reply

    state._op_stash = replay
    with pytest.raises(veil.IntegrityError, match="failed authentication"):
        loro.generate([1, 2, 3], max_new_tokens=4)


def test_pad_products_dtype_halves_the_bytes_and_stays_exact_enough():
    with veil.load("tiny-llama") as plain:
        ref = plain.logits([[1, 2, 3, 4]])
    moved = {}
    for dt in ("float32", "float64"):
        with veil.load("tiny-llama", scheme="loro", pad_products=dt) as m:
            assert (m.logits([[1, 2, 3, 4]]) - ref).abs().max() < 1e-4
            moved[dt] = m.generate([1, 2, 3], max_new_tokens=4).cost.split.pad_bytes_used
    # sealed rows: 16-byte tag + out floats each
    assert 1.8 < moved["float64"] / moved["float32"] < 2.0
    with pytest.raises(veil.ConfigError, match="pad_products"):
        veil.load("tiny-llama", scheme="loro", pad_products="float16")
