"""plain against transformers' own implementations: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

import veil
from conftest import max_abs

TINY_TOL = 1e-4
DEFAULT_TOL = 1e-3


def test_tiny_logits_match_transformers(tiny_hf):
    name, folder, hf = tiny_hf
    m = veil.load(folder)
    ids = [[3, 17, 99, 5, 42, 7, 250, 11, 64, 2, 9, 130]]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits
    assert max_abs(m.logits(ids), ref) <= TINY_TOL, name


def test_tiny_greedy_matches_transformers(tiny_hf):
    name, folder, hf = tiny_hf
    m = veil.load(folder)
    prompt = [5, 9, 33, 1]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False, pad_token_id=0)
    r = m.generate(prompt, max_new_tokens=32)
    r_tokens = r.token_ids
    assert r_tokens == ref[0, len(prompt):len(prompt) + len(r_tokens)].tolist(), name


def test_padded_batch_equals_single_rows(tiny_hf):
    name, folder, _ = tiny_hf
    m = veil.load(folder)
    prompts = [[4, 8, 15, 16, 23, 42], [7, 3], [9, 9, 9, 1]]
    batch = m.generate(prompts, max_new_tokens=12)
    for p, b in zip(prompts, batch):
        single = m.generate(p, max_new_tokens=12)
        assert b.token_ids == single.token_ids, (name, p)
    # logits of a short row, right-aligned in a padded batch, match the row alone
    logits = m.logits(prompts)
    alone = m.logits([prompts[1]])
    assert max_abs(logits[1, -2:], alone[0]) <= TINY_TOL


def test_decode_with_cache_equals_full_forward(tiny_hf):
    """The KV-cached step-by-step logits equal one full forward over the whole sequence."""
    name, folder, _ = tiny_hf
    m = veil.load(folder)
    r = m.generate([1, 2, 3], max_new_tokens=10)
    full = m.logits([[1, 2, 3] + r.token_ids[:-1]])[0]
    assert full[2:].argmax(-1).tolist() == r.token_ids, name


@pytest.mark.default_model
def test_default_logits_match_transformers(default_folder, default_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(default_folder), dtype=torch.float32).eval()
    ids = default_model.encode("The quick brown fox jumps over the lazy dog because")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits
        want = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                           do_sample=False)[0, len(ids):].tolist()
    err = max_abs(default_model.logits([ids]), ref)
    assert err <= DEFAULT_TOL, err
    got = default_model.generate(ids, max_new_tokens=32)
    assert got.token_ids == want[:len(got.token_ids)]
    assert len(got.token_ids) == 32 or got.finish_reason == "eos"


@pytest.mark.default_model
def test_default_chat_answers(default_model):
    r = default_model.generate("What is the capital of France?", chat=True, max_new_tokens=16)
    assert "Paris" in r.text
