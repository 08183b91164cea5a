"""Sampling, stopping and streaming."""

from __future__ import annotations

import pytest
import torch

import veil
from veil.backends.plain import TorchOps
from veil.model.generate import SamplingConfig, pick_next
from veil.schemes.base import StepSession


@pytest.fixture(scope="module")
def tiny():
    return veil.load("tiny-llama")


def test_seeded_sampling_is_reproducible(tiny):
    a = tiny.generate([1, 2, 3], max_new_tokens=16, temperature=1.0, seed=7)
    b = tiny.generate([1, 2, 3], max_new_tokens=16, temperature=1.0, seed=7)
    c = tiny.generate([1, 2, 3], max_new_tokens=16, temperature=1.0, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_one_is_greedy(tiny):
    greedy = tiny.generate([4, 5, 6], max_new_tokens=12)
    sampled = tiny.generate([4, 5, 6], max_new_tokens=12, temperature=0.7, top_k=1, seed=3)
    assert sampled.token_ids == greedy.token_ids


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    s = SamplingConfig(temperature=1.0, top_p=0.7)
    gen = torch.Generator().manual_seed(0)
    picks = {int(pick_next(logits, s, gen)) for _ in range(300)}
    assert picks == {0, 1}


def test_top_k_keeps_only_k():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    s = SamplingConfig(temperature=2.0, top_k=2)
    gen = torch.Generator().manual_seed(0)
    assert {int(pick_next(logits, s, gen)) for _ in range(300)} == {0, 1}


def test_max_new_tokens_and_eos(tiny):
    r = tiny.generate([1, 2, 3], max_new_tokens=5)
    assert len(r.token_ids) <= 5
    # declare the first greedy token an EOS: generation must end right there
    first = tiny.generate([1, 2, 3], max_new_tokens=1).token_ids[0]
    cfg = tiny.cfg.with_(eos_token_ids=(first,))
    tiny2 = veil.Model(StepSession("plain", cfg, tiny.ops), None, "tiny")
    r2 = tiny2.generate([1, 2, 3], max_new_tokens=10)
    assert r2.token_ids == [first] and r2.finish_reason == "eos"


def test_generation_stops_at_context_limit():
    m = veil.load("tiny-gpt2")
    cfg = m.cfg.with_(eos_token_ids=())
    m = veil.Model(StepSession("plain", cfg, TorchOps(cfg, m.ops.w)), None, "tiny")
    r = m.generate(list(range(1, 121)), max_new_tokens=50)
    assert len(r.token_ids) == 128 - 120 and r.finish_reason == "context"


@pytest.mark.default_model
def test_stop_strings_and_streaming(default_model):
    pieces: list[str] = []
    r = default_model.generate("Count: one, two, three,", max_new_tokens=24, stream=pieces.append)
    assert "".join(pieces) == r.text
    words = r.text.split()
    assert len(words) >= 4, r.text
    stop = words[len(words) // 2]
    pieces2: list[str] = []
    r2 = default_model.generate("Count: one, two, three,", max_new_tokens=24, stop=[stop],
                                stream=pieces2.append)
    assert r2.finish_reason == "stop" and stop not in r2.text
    assert r2.text == r.text[:r.text.find(stop)]
    assert "".join(pieces2) == r2.text, "the stream never shows the stop string"
