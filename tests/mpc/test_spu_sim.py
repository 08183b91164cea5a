"""Private generation in SPU's simulator: same greedy tokens as plain, logits within the
fixed-point tolerance, the cache and next input kept secret-shared between steps."""

from __future__ import annotations

import numpy as np
import pytest

import veil
from veil.errors import ConfigError
from veil.mpc.program import params_of
from veil.mpc.spu_runtime import MpcConfig, simulate

# SEMI2K, FM64, 18 fractional bits: fixed-point rounding plus SPU's exp / rsqrt / reciprocal
# approximations; measured ≤ 2.5e-3 on the tiny presets (logits of magnitude ~1).
FXP_TOL = 1e-2


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_semi2k_matches_plain(preset):
    m = veil.load(preset)
    prompt = [3, 17, 99, 5, 42, 7]
    ref = m.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids
    r = simulate(m.cfg, params_of(m.cfg, m.ops.w), prompt, 8, MpcConfig(), reveal_logits=True)
    assert r.tokens == ref
    full = m.logits([prompt + ref[:-1]])[0].numpy()
    err = max(float(np.abs(r.logits[i].reshape(-1) - full[len(prompt) - 1 + i]).max()) for i in range(8))
    assert err < FXP_TOL, err


def test_bad_settings():
    with pytest.raises(ConfigError, match="protocol"):
        MpcConfig(protocol="gmw")
    with pytest.raises(ConfigError, match="fxp_bits"):
        MpcConfig(fxp_bits=40)


@pytest.mark.parametrize("parties", ["sim", "local"])
def test_scheme_mpc_through_the_api(parties):
    plain = veil.load("tiny-gpt2")
    m = veil.load("tiny-gpt2", scheme="mpc", parties=parties, timeout_s=30)
    seen = []
    r = m.generate([5, 6, 7, 8], max_new_tokens=5, stream=None, ignore_eos=True)
    assert r.token_ids == plain.generate([5, 6, 7, 8], max_new_tokens=5, ignore_eos=True).token_ids
    assert r.cost.scheme == "mpc" and r.cost.prefill_s > 0 and r.cost.decode_s > 0
    with pytest.raises(veil.UnsupportedError, match="greedily"):
        m.generate([5, 6], max_new_tokens=2, temperature=0.7)
    with pytest.raises(veil.UnsupportedError, match="one prompt"):
        m.generate([[5, 6], [7, 8]], max_new_tokens=2)
    with pytest.raises(ConfigError, match="parties"):
        veil.load("tiny-gpt2", scheme="mpc", parties="cloud")
