"""LoRO against plain: exactness, the device view, resident secrets."""

from __future__ import annotations

import pytest
import torch

import veil
from conftest import assert_logits_close
from veil.attacks.audit import audit_run
from veil.schemes import get
from veil.errors import ConfigError
from veil.tee.schemes.loro import LoroConfig

TOL = get("loro").tolerance     # declared with the scheme (veil/schemes/loro.py)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
@pytest.mark.parametrize("options", [{"pads": "fixed"}, {"attention_mixing": "permute", "bank": 0}])
def test_tiny_matches_plain_in_other_modes(preset, options):
    """The defaults are in the conformance suite; these are the other modes."""
    plain = veil.load(preset)
    loro = veil.load(preset, scheme="loro", **options)
    ids = [[3, 17, 99, 5, 42, 7, 250, 11, 64, 2, 9, 130]]
    assert_logits_close(loro.logits(ids), plain.logits(ids), TOL.tiny)
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    assert ([g.token_ids for g in plain.generate(prompts, max_new_tokens=16)]
            == [g.token_ids for g in loro.generate(prompts, max_new_tokens=16)])


def test_device_holds_only_masked_weights_sealed_pads_and_no_norms():
    loro = veil.load("tiny-llama", scheme="loro")
    loro.generate([1, 2, 3], max_new_tokens=2)
    resident = loro.device_view().resident
    weights = {k for k in resident if k.endswith(".weight")}
    stores = {k for k in resident if k.startswith("pads.")}
    assert all("norm" not in k for k in weights) and not any(k.endswith(".bias") for k in resident)
    assert stores and all(resident[k].dtype == torch.uint8 for k in stores)   # ciphertext only
    assert set(resident) - weights - stores == {"kv_cache.k", "kv_cache.v"}


def test_invalid_options():
    with pytest.raises(ConfigError, match="loro: option 'pads' expects one of 'fresh', 'fixed'"):
        veil.load("tiny-llama", scheme="loro", pads="sometimes")
    with pytest.raises(ConfigError, match="loro"):
        veil.load("tiny-llama", scheme="loro", colour="blue")
    with pytest.raises(ConfigError, match="attention_mixing"):
        veil.load("tiny-llama", scheme="loro", attention_mixing="shuffle")
    with pytest.raises(ConfigError, match="loro: option 'rank' must be ≥ 1, got 0"):
        veil.load("tiny-llama", scheme="loro", rank=0)
    with pytest.raises(ConfigError, match="device_threads.*need device='process'"):
        veil.load("tiny-llama", scheme="loro", device_threads=2)


@pytest.mark.default_model
def test_default_matches_plain(default_model):
    loro = veil.load("default", scheme="loro", verify=True)  # Freivalds: no false alarm either
    ids = default_model.encode("The quick brown fox jumps over the lazy dog because")
    assert_logits_close(loro.logits([ids]), default_model.logits([ids]), TOL.default)
    assert (loro.generate(ids, max_new_tokens=32).token_ids
            == default_model.generate(ids, max_new_tokens=32).token_ids)


@pytest.mark.default_model
def test_default_device_view_audit_and_resident_secrets(default_model):
    ids = default_model.encode("Alice shared her medical history with the assistant:")
    report = audit_run("default", "loro", ids, max_new_tokens=8)
    # every weight and every activation the device holds or receives, against its true counterpart.
    # The design value is 1/√(1+pad_ratio²) = 0.179 per row; a call site whose rows are dominated
    # by one attention-sink row (layer 11's mlp.down input) is one row's draw, with a spread of
    # ≈ 0.179·5.5/√1536 ≈ 0.025 (measured 0.18–0.21 over runs), so the bound on the worst site
    # leaves ~3σ; the mean over all ~480 sites is stable and held to the design value.
    matched = [r.cos_matched for r in report.rows if r.cos_matched == r.cos_matched]
    assert report.max_cos_matched < 0.25, report.worst(3)
    assert sum(matched) / len(matched) < 1 / (1 + LoroConfig().pad_ratio ** 2) ** 0.5
    # and against any true weight of its shape
    assert report.max_cos_weight < 0.2, report.worst(3)
    loro = veil.load("default", scheme="loro")
    weight_bytes = default_model.cfg.n_params() * 4
    assert loro.ops.resident_secret_bytes() < 0.02 * weight_bytes


def test_placement_matches_the_device_view():
    """What `veil explain --scheme loro` says the device holds is what it holds (every scheme's
    rows against its view, pattern by pattern: the conformance suite)."""
    loro = veil.load("tiny-gpt2", scheme="loro", record_view=True)
    loro.generate([1, 2, 3], max_new_tokens=3)
    view = loro.device_view()
    held = {row.op for row in get("loro").placement if row.device_holds != "—"}
    assert held == {"embedding lookup", "q/k/v, o, gate/up, down", "attention", "LM head",
                    "pad products g·W'ᵀ (made offline)"}
    assert {"kv_cache.k", "kv_cache.v", "embed.weight"} <= set(view.resident)
    assert any(k.startswith("pads.") for k in view.resident)
    ops_received = {name.split(":")[0] for name, _ in view.received}
    assert ops_received == {"linear", "attention", "rows"}  # rows: token ids and positions


@pytest.mark.parametrize("op", ["linear", "rows"])
def test_freivalds_catches_a_device_that_alters_one_value(op):
    plain = veil.load("tiny-llama")
    loro = veil.load("tiny-llama", scheme="loro", verify=True)
    assert loro.generate([1, 2, 3], max_new_tokens=8).token_ids == \
        plain.generate([1, 2, 3], max_new_tokens=8).token_ids   # honest device passes
    state = loro.ops.device_state
    honest = getattr(state, f"_op_{op}")
    calls = {"n": 0}

    def evil(msg):
        reply = honest(msg)
        calls["n"] += 1
        if calls["n"] == 5:                       # one value of one reply, mid-generation
            t = reply.tensors[0].view(-1)
            t[3] += 0.5 * float(t.abs().max())
        return reply

    setattr(state, f"_op_{op}", evil)
    with pytest.raises(veil.IntegrityError, match="failed verification"):
        loro.generate([1, 2, 3], max_new_tokens=8)


@pytest.mark.parametrize("preset, gated", [("tiny-llama", True), ("tiny-gpt2", False)])
def test_round_trips_per_decode_step(preset, gated):
    """One decode step = per layer: q/k/v, attention, o, gate/up (or up), down — plus the
    embedding rows (and gpt2's position rows) and the LM head. A change that adds a round trip fails."""
    loro = veil.load(preset, scheme="loro")
    one = loro.generate([1, 2, 3], max_new_tokens=1).cost.split.round_trips
    two = loro.generate([1, 2, 3], max_new_tokens=2).cost.split.round_trips
    tables = 1 if gated else 2
    assert two - one == 5 * loro.cfg.n_layers + tables + 1


def test_cost_reports_both_sides():
    """The device's FLOPs (as it reports them) are exactly the model's forward FLOPs — the device
    does all of the model's heavy work — and the enclave's are its corrections; both sides' times
    and the offline pad work are recorded."""
    loro = veil.load("tiny-llama", scheme="loro")
    cost = loro.generate([1, 2, 3, 4], max_new_tokens=5, ignore_eos=True).cost
    s = cost.split
    assert s.device_flops == cost.flops
    assert s.enclave_flops > 0
    assert s.device_busy_s > 0 and 0 < s.enclave_wait_s < cost.prefill_s + cost.decode_s
    assert s.offline_flops > 0 and s.offline_s > 0
    assert "device busy" in cost.summary()
