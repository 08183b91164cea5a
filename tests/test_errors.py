"""Bad input gets a specific VeilError naming the problem (Python) or a one-line exit (CLI)."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import veil
from veil.cli import app
from veil.errors import CheckpointError, InputError, UnsupportedError


@pytest.fixture()
def llama_copy(tiny_hf, tmp_path):
    name, folder, _ = tiny_hf
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return name, dst


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file or folder"):
        veil.load("/nonexistent/model")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        veil.load(tmp_path)


def test_unsupported_architecture_is_named(llama_copy):
    _, folder = llama_copy
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match=r"'mamba'.*supported: llama.*qwen2.*gpt2"):
        veil.load(folder)


def test_truncated_safetensors(llama_copy):
    _, folder = llama_copy
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors"):
        veil.load(folder)


def test_garbage_safetensors(llama_copy):
    _, folder = llama_copy
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="safetensors"):
        veil.load(folder)


def test_missing_tensor_is_named(llama_copy):
    name, folder = llama_copy
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    victim = next(k for k in tensors if "layers.1" in k or "h.1." in k)
    del tensors[victim]
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match="missing tensor"):
        veil.load(folder)


def test_wrong_shape_is_named(llama_copy):
    name, folder = llama_copy
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    victim = next(k for k in tensors if k.endswith("mlp.down_proj.weight") or k.endswith("mlp.c_proj.weight"))
    tensors[victim] = tensors[victim][:, :-1].contiguous()
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=r"shape"):
        veil.load(folder)


def test_pickled_checkpoint_refused(llama_copy):
    _, folder = llama_copy
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="unpickling"):
        veil.load(folder)


def test_corrupt_and_truncated_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("VEIL_CACHE", str(tmp_path / "cache"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"hello" * 100)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        veil.load(junk)
    from veil.model.zoo import default_gguf

    cut = tmp_path / "cut.gguf"
    with default_gguf().open("rb") as f:
        cut.write_bytes(f.read(5_000_000))
    with pytest.raises(CheckpointError, match="corrupt or truncated GGUF"):
        veil.load(cut)
    assert not list((tmp_path / "cache" / "models").glob("cut-*")), "no half-written cache"


def test_prompt_longer_than_context():
    m = veil.load("tiny-llama")
    with pytest.raises(InputError, match="context is 128"):
        m.generate(list(range(3, 200)), max_new_tokens=4)
    with pytest.raises(InputError, match="context"):
        m.logits([[5] * 300])


@pytest.mark.parametrize("batch", [[1, 2, 3], "hello", ["hello"], [[1, "x"]]])
def test_logits_needs_a_batch_of_id_rows(batch):
    m = veil.load("tiny-llama")
    with pytest.raises(InputError, match="batch"):
        m.logits(batch)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_invalid_sampling_parameters(kwargs, match):
    m = veil.load("tiny-llama")
    with pytest.raises(InputError, match=match):
        m.generate([1, 2, 3], **kwargs)


def test_token_out_of_vocab_and_text_without_tokenizer():
    m = veil.load("tiny-gpt2")
    with pytest.raises(InputError, match="outside the vocabulary"):
        m.generate([1, 99999])
    with pytest.raises(InputError, match="no tokenizer"):
        m.generate("hello")


def test_unknown_scheme():
    with pytest.raises(UnsupportedError, match="unknown scheme 'nope'.*plain"):
        veil.load("tiny-llama", scheme="nope")


@pytest.mark.parametrize("args, match", [
    (["generate", "hi", "--model", "/nonexistent"], "no such file or folder"),
    (["generate", "1 2 3", "--model", "tiny-llama", "--top-p", "2"], "top_p"),
    (["info", "/nonexistent"], "CheckpointError"),
])
def test_cli_errors_are_one_line(args, match):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert match in res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
