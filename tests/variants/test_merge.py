"""MERGE as model variants: the knobs on plain, the merge's exactness, embedding resending, the
jax program, SPU private generation, the native model folder and the training recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import veil
from conftest import student
from veil.backends.plain import TorchOps
from veil.errors import CheckpointError, ConfigError
from veil.model import native
from veil.model.forward import forward, hidden_states
from veil.model.generate import SamplingConfig, generate_ids
from veil.mpc.program import generate_plaintext, params_of
from veil.mpc.config import MpcConfig
from veil.mpc.spu_runtime import simulate
from veil.model.ops import Step
from veil.variants.merge import merge


def full_step(T: int, B: int = 1) -> Step:
    return Step(torch.arange(T).expand(B, T), None, 0)


def test_gpt2_merge_is_exact():
    cfg, w = student("tiny-gpt2")
    assert cfg.norm == "affine" and cfg.activation == "quad" and cfg.quad == (0.125, 0.25, 0.5)
    mcfg, mw = merge(cfg, w)
    assert not any("norm" in k and k.startswith("layers.") for k in mw)
    assert not any(".attn.q." in k or ".attn.k." in k for k in mw)
    ids = torch.randint(0, 256, (2, 20))
    a, b = TorchOps(cfg, w), TorchOps(mcfg, mw)
    ya = forward(cfg, a, ids, full_step(20, 2), a.new_cache(2, 20))
    yb = forward(mcfg, b, ids, full_step(20, 2), b.new_cache(2, 20))
    assert float((ya - yb).abs().max()) < 1e-5 * float(ya.abs().max()) + 1e-5


def test_llama_student_keeps_rms_and_refuses_merge():
    cfg, w = student("tiny-llama")
    assert cfg.norm == "rms" and cfg.activation == "quad" and cfg.quad != (0.125, 0.25, 0.5)
    with pytest.raises(ConfigError, match="affine"):
        merge(cfg, w)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_constant_attention_decodes_like_the_full_forward(preset):
    """Incremental steps over the value cache give the full-sequence logits, also with a
    left-padded batch (positions restart per row)."""
    cfg, w = student(preset, "only-mm")
    ops = TorchOps(cfg, w)
    seq = torch.randint(0, 256, (1, 12))
    full = forward(cfg, ops, seq, full_step(12), ops.new_cache(1, 12))[0]
    cache = ops.new_cache(1, 12)
    out = [forward(cfg, ops, seq[:, :9], full_step(9), cache)[0]]
    for t in range(9, 12):
        out.append(forward(cfg, ops, seq[:, t:t + 1], Step(torch.tensor([[t]]), None, t), cache)[0])
    assert torch.allclose(torch.cat(out), full, atol=1e-5)
    # the same prompt left-padded in a batch gives the same greedy tokens
    prompts = [seq[0, :7].tolist(), seq[0, :4].tolist()]
    rows, _ = generate_ids(cfg, ops, prompts, SamplingConfig(max_new_tokens=4, stop_on_eos=False))
    for r, p in zip(rows, prompts):
        alone, _ = generate_ids(cfg, ops, [p], SamplingConfig(max_new_tokens=4, stop_on_eos=False))
        assert r.token_ids == alone[0].token_ids


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_jax_constant_attention_matches_plain_on_a_padded_batch(preset):
    """The jax form (what SPU runs) reads the table at each row's own positions: a left-padded
    batch's prompt step and two decode steps give plain's logits at every real position."""
    import jax.numpy as jnp

    from veil.mpc.jax_ops import JaxCache, JaxOps
    from veil.mpc.program import one_hot

    cfg, w = student(preset, "only-mm")
    ops, jops = TorchOps(cfg, w), JaxOps(cfg, params_of(cfg, w))
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False                                    # row 1: 3 pads, then 4 tokens
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    tcache, jcache = ops.new_cache(2, 9), JaxCache.zeros(cfg, 2, 9)
    steps = [(ids, Step(pos, mask, 0))]
    nxt = torch.randint(0, 256, (2, 2), generator=torch.Generator().manual_seed(4))
    for t in range(2):
        steps.append((nxt[:, t:t + 1], Step(pos[:, -1:] + 1 + t, None, 7 + t)))
    for x, st in steps:
        want = forward(cfg, ops, x, st, tcache)
        kv = None if st.key_valid is None else jnp.asarray(st.key_valid.numpy())
        got = forward(cfg, jops, one_hot(x.numpy(), cfg.vocab_size),
                      Step(jnp.asarray(st.positions.numpy()), kv, st.start), jcache)
        real = slice(3, None) if st.start == 0 else slice(None)
        assert np.abs(np.asarray(got)[0] - want[0].numpy()).max() < 1e-4
        assert np.abs(np.asarray(got)[1, real] - want[1, real].numpy()).max() < 1e-4


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_embedding_resend_feeds_back_the_last_state(preset):
    """The states the loop produces are what one forward over [prompt embeddings; states] gives,
    and the tokens are the LM head's argmax over them."""
    cfg, w = student(preset, "merge")
    ops = TorchOps(cfg, w)
    prompt = [3, 17, 99, 5]
    rows, trace = generate_ids(cfg, ops, [prompt], SamplingConfig(max_new_tokens=6,
                                                                   stop_on_eos=False))
    assert len(rows[0].token_ids) == 6 and trace.decode_steps == 5
    with torch.inference_mode():
        emb = ops.embed(torch.tensor([prompt]))
        states = []
        for i in range(6):
            x = torch.cat([emb, *states], 1) if states else emb
            h = hidden_states(cfg, ops, None, full_step(x.shape[1]), ops.new_cache(1, x.shape[1]),
                              embeds=x)
            states.append(h[:, -1:])
        expect = ops.lm_head(torch.cat(states, 1)).argmax(-1)[0].tolist()
    assert rows[0].token_ids == expect


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("variant", ["merge", "only-er", "only-mm"])
def test_jax_program_matches_plain(preset, variant):
    cfg, w = student(preset, variant)
    if cfg.norm == "affine":
        cfg, w = merge(cfg, w)
    prompt = [5, 6, 7, 8]
    tokens, logits = generate_plaintext(cfg, w, prompt, 6)
    ops = TorchOps(cfg, w)
    rows, _ = generate_ids(cfg, ops, [prompt], SamplingConfig(max_new_tokens=6, stop_on_eos=False))
    assert tokens == rows[0].token_ids
    if cfg.generation == "embedding_resend":
        return                                 # the states are checked in the SPU test below
    ref = forward(cfg, ops, torch.tensor([prompt + tokens[:-1]]), full_step(9), ops.new_cache(1, 9))
    for i, lg in enumerate(logits):
        assert np.abs(np.asarray(lg).reshape(-1) - ref[0, 3 + i].numpy()).max() < 1e-4


# SEMI2K FM64/18: measured ≤ 1.9e-3 on these students (the table mixing and quad are exact
# products; the error is fixed-point rounding through the layers)
FXP_TOL = 1e-2


@pytest.mark.mpc
@pytest.mark.parametrize("preset, variant", [("tiny-llama", "merge"), ("tiny-gpt2", "merge"),
                                             ("tiny-gpt2", "only-er")])
def test_merge_under_semi2k_matches_plaintext(preset, variant):
    # an untrained random student whose resent states stay bounded (a calibrated one's states
    # grow without training: quad over resent states compounds)
    cfg, w = student(preset, variant, calibrated=False)
    if cfg.norm == "affine":
        cfg, w = merge(cfg, w)
    prompt = [5, 6, 7, 8]
    tokens, logits = generate_plaintext(cfg, w, prompt, 8)
    assert max(float(np.abs(lg).max()) for lg in logits) < 100
    # the strict ending (argmax in the head, tokens revealed) and the paper's (logits revealed,
    # the client decodes)
    for mc in (MpcConfig(), MpcConfig(reveal="logits")):
        r = simulate(cfg, params_of(cfg, w), prompt, 8, mc, reveal_logits=True)
        assert r.tokens == tokens and r.head_s > 0 and len(r.logits) == 8
        err = max(float(np.abs(np.asarray(a).reshape(-1) - np.asarray(b).reshape(-1)).max())
                  for a, b in zip(logits, r.logits))
        assert err < FXP_TOL, err


@pytest.mark.mpc
def test_native_folder_round_trip_and_errors(tmp_path):
    cfg, w = student("tiny-gpt2", calibrated=False)
    mcfg, mw = merge(cfg, w)
    folder = native.save_native(tmp_path / "m", mcfg, mw)
    m = veil.load(folder)
    assert m.cfg == mcfg
    out = m.generate([3, 4, 5], max_new_tokens=4, ignore_eos=True).token_ids
    assert len(out) == 4
    with pytest.warns(UserWarning, match="dealer"):
        mm = veil.load(folder, scheme="merge")
    assert mm.generate([3, 4, 5], max_new_tokens=4, ignore_eos=True).token_ids == out
    with pytest.raises(ConfigError, match="MERGE model"):
        veil.load("tiny-gpt2", scheme="merge")
    data = json.loads((folder / native.CONFIG_FILE).read_text())
    (folder / native.CONFIG_FILE).write_text(json.dumps({**data, "bogus": 1}))
    with pytest.raises(ConfigError, match="bogus"):
        veil.load(folder)
    (folder / native.CONFIG_FILE).write_text(json.dumps({**data, "n_layers": 3}))
    with pytest.raises(CheckpointError, match="missing tensor"):
        veil.load(folder)


@pytest.mark.mpc
def test_merge_with_party_processes(tmp_path):
    """scheme='merge' with one OS process per party over TCP, the model read from a veil folder."""
    cfg, w = student("tiny-llama", calibrated=False)
    folder = native.save_native(tmp_path / "m", cfg, w)
    prompt = [3, 17, 99, 5]
    ref = veil.load(folder).generate(prompt, max_new_tokens=5, ignore_eos=True).token_ids
    with pytest.warns(UserWarning, match="dealer"):
        m = veil.load(folder, scheme="merge", parties="local", timeout_s=120)
    assert m.generate(prompt, max_new_tokens=5, ignore_eos=True).token_ids == ref
