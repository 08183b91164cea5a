"""The norm form each model gets under MPC (a public calibration), the MERGE paper's vanilla
ending (softmax before the argmax), SPU's local truncation, and the bench's network relay."""

from __future__ import annotations

import numpy as np
import pytest

import veil
from veil.errors import ConfigError
from veil.mpc.calibration import PLAIN_MAX_ABS, needs_norm_form, norm_range, resolve
from veil.mpc.config import MpcConfig
from veil.mpc.program import params_of
from veil.mpc.spu_runtime import SpuOps, SpuOpsPlainNorm, simulate, spu_ops

FXP_TOL = 1e-2


def test_the_norm_form_follows_the_model():
    m = veil.load("tiny-gpt2")
    form, shift = needs_norm_form(m.cfg, m.ops.w)
    assert form == "plain" and shift > 0      # small test activations are scaled up first
    mc = resolve(MpcConfig(), m.cfg, m.ops.w)
    assert (mc.norm_range, mc.norm_shift) == (form, shift)
    # an explicit choice is kept; unresolved "auto" compiles the form correct for every model
    assert resolve(MpcConfig(norm_range="reduced"), m.cfg, m.ops.w).norm_range == "reduced"
    assert spu_ops(MpcConfig()) is SpuOps and spu_ops(MpcConfig(norm_range="plain")) is SpuOpsPlainNorm
    # massive activations push a model out of the plain form's range
    w = dict(m.ops.w)
    w["embed.weight"] = w["embed.weight"].clone()
    w["embed.weight"][:128, 3] = 20000.0     # some tokens massive, others small: no scale fits
    assert norm_range(m.cfg, w).max_abs > PLAIN_MAX_ABS
    assert needs_norm_form(m.cfg, w) == ("reduced", 0)
    with veil.load("tiny-gpt2", scheme="mpc") as private:
        assert private.session.mc.norm_range == "plain"


@pytest.mark.default_model
def test_the_default_model_needs_the_reduced_form(default_model):
    r = norm_range(default_model.cfg, default_model.ops.w)
    assert r.max_abs > PLAIN_MAX_ABS and not r.plain_fits


@pytest.mark.parametrize("form, shift", [("plain", None), ("reduced", 0)])
def test_both_norm_forms_match_plain(form, shift):
    m = veil.load("tiny-gpt2")
    prompt = [3, 17, 99, 5]
    ref = m.generate(prompt, max_new_tokens=4, ignore_eos=True).token_ids
    if shift is None:
        shift = needs_norm_form(m.cfg, m.ops.w)[1]
    r = simulate(m.cfg, params_of(m.cfg, m.ops.w), prompt, 4,
                 MpcConfig(norm_range=form, norm_shift=shift), reveal_logits=True)
    assert r.tokens == ref
    full = m.logits([prompt + ref[:-1]])[0].numpy()
    err = max(float(np.abs(r.logits[i].reshape(-1) - full[len(prompt) - 1 + i]).max())
              for i in range(4))
    assert err < FXP_TOL, err


def test_vanilla_paper_gives_vanillas_tokens():
    """The softmax over the vocabulary before the argmax (the MERGE paper's vanilla) changes
    the cost, not the token."""
    m = veil.load("tiny-gpt2")
    prompt = [3, 17, 99, 5]
    params = params_of(m.cfg, m.ops.w)
    vanilla = simulate(m.cfg, params, prompt, 4, MpcConfig()).tokens
    paper = simulate(m.cfg, params, prompt, 4, MpcConfig(head_softmax=True)).tokens
    assert paper == vanilla == m.generate(prompt, max_new_tokens=4, ignore_eos=True).token_ids


def test_local_truncation_error_over_a_generation():
    """trunc_msb (SPU's local truncation) keeps plain's tokens on a tiny model, and the bench
    that measures its error over a generation reports it against plain's own step logits."""
    from veil.bench.mpc_error import markdown, measure

    r = measure("tiny-gpt2", 4)
    assert MpcConfig(trunc_msb=True).runtime_config().trunc_allow_msb_error
    for key in ("off", "on"):
        run = r["runs"][key]
        assert run["same_tokens"] and run["first_diff"] is None
        assert len(run["per_step_max_abs_logit_err"]) == 4
        assert run["max_abs_logit_err"] < 1e-2, run
    assert r["max_abs_on_vs_off"] < 1e-2
    md = markdown({"when": "today", "machine": "cpu"}, [r])
    assert "| tiny" in md and "True / True" in md


def test_bad_lever_settings():
    with pytest.raises(ConfigError, match="norm_range"):
        MpcConfig(norm_range="huge")
    with pytest.raises(ConfigError, match="head_softmax"):
        MpcConfig(head_softmax=True, reveal="logits")
    with pytest.raises(ConfigError, match="trunc_msb"):
        MpcConfig(trunc_msb="yes")
    with pytest.raises(ConfigError, match="norm_range"):
        veil.load("tiny-gpt2", scheme="mpc", norm_range="huge")
