"""Every CLI subcommand runs (tiny configs; the default model where marked)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from veil.cli import app

runner = CliRunner()


def test_generate_tiny_preset_token_ids():
    res = runner.invoke(app, ["generate", "1 2 3", "--model", "tiny-llama", "-n", "5"])
    assert res.exit_code == 0, res.output
    assert len(res.stdout.strip().splitlines()[0].split()) == 5
    assert "[plain]" in res.output and "decode" in res.output


def test_models_and_info():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "tiny-qwen2" in res.output
    res = runner.invoke(app, ["info", "tiny-gpt2"])
    assert res.exit_code == 0 and "parameters" in res.output and "layer / gelu_tanh / plain" in res.output


@pytest.mark.default_model
def test_generate_default_chat_stream():
    res = runner.invoke(app, ["generate", "What is the capital of France?", "--chat", "--stream",
                              "-n", "12"])
    assert res.exit_code == 0, res.output
    assert "Paris" in res.stdout


@pytest.mark.default_model
def test_eval_ppl_default():
    res = runner.invoke(app, ["eval", "ppl", "--windows", "2", "--window", "64"])
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.output


def test_explain_lists_placement_and_flags_leaks():
    res = runner.invoke(app, ["explain", "--scheme", "loro"])
    assert res.exit_code == 0, res.output
    assert "attention" in res.output and "token ids" in res.output
    res = runner.invoke(app, ["explain", "--scheme", "nope"])
    assert res.exit_code == 2 and "unknown scheme 'nope'" in res.output


def test_explain_with_a_model_prints_the_he_depth_plan():
    res = runner.invoke(app, ["explain", "--scheme", "he", "--model", "tiny-power"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "Goldschmidt" in out and "refresh before layer 0 Power-Softmax denominator" in out
    assert "x + R, R uniform in ±64" in out
    res = runner.invoke(app, ["explain", "--scheme", "he", "--model", "tiny-power",
                              "--set", "mask=false"])
    assert "the activation itself (mask=false)" in " ".join(res.output.split())
    res = runner.invoke(app, ["explain", "--scheme", "he", "--model", "tiny-llama"])
    assert res.exit_code == 2 and "cannot run activation='silu'" in res.output


def test_set_with_a_wrong_type_names_the_option():
    """`--set rank=abc` used to print "'<' not supported between instances of 'str' and 'int'"."""
    res = runner.invoke(app, ["generate", "1 2 3", "--model", "tiny-llama", "--scheme", "loro",
                              "--set", "rank=abc", "-n", "2"])
    assert res.exit_code == 2
    assert "loro: option 'rank' expects an integer, got 'abc'" in res.output
