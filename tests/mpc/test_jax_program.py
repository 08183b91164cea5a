"""The forward as a pure jax step (what SPU compiles) against plain, in plaintext jax."""

from __future__ import annotations

import numpy as np
import pytest

import veil
from veil.mpc.program import generate_plaintext, one_hot


def test_one_hot():
    x = one_hot([[2, 0]], 4)
    assert x.shape == (1, 2, 4) and x.dtype == np.float32
    assert x.tolist() == [[[0, 0, 1, 0], [1, 0, 0, 0]]]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_jax_step_matches_plain(preset):
    """Prefill then 7 decode steps through one compiled step each, a fixed-capacity cache updated
    at a public slot: same greedy tokens as plain, logits within float32 rounding."""
    m = veil.load(preset)
    prompt = [3, 17, 99, 5, 42]
    tokens, logits = generate_plaintext(m.cfg, m.ops.w, prompt, 8, capacity=24)
    ref = m.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids
    assert tokens == ref
    full = m.logits([prompt + ref[:-1]])[0].numpy()
    for i, step_logits in enumerate(logits):
        np.testing.assert_allclose(step_logits[0], full[len(prompt) - 1 + i], atol=1e-5)
