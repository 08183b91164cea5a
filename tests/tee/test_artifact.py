"""veil protect → DIR; veil.load(DIR): same tokens; tampering and wrong keys are refused."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import veil
from veil.cli import app
from veil.errors import ConfigError, IntegrityError
from veil.schemes.artifacts import protect


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("art")
    key = root / "keys" / "veil.key"
    protect("tiny-llama", "loro", root / "out", key_file=key)
    return root / "out", key


def test_layout_and_round_trip(artifact):
    folder, key = artifact
    assert (folder / "device" / "model.safetensors").is_file()
    assert (folder / "enclave.sealed").is_file() and not list(folder.rglob("*.key"))
    plain = veil.load("tiny-llama")
    m = veil.load(folder, key_file=key, verify=True)
    assert m.scheme == "loro"
    assert m.generate([1, 2, 3], max_new_tokens=10).token_ids == \
        plain.generate([1, 2, 3], max_new_tokens=10).token_ids
    m.close()


def test_wrong_key_and_tampering_refused(artifact, tmp_path):
    import shutil

    folder, key = artifact
    other = tmp_path / "other.key"
    from veil.tee.sealing import write_key

    write_key(other)
    with pytest.raises(IntegrityError, match="authentication failed"):
        veil.load(folder, key_file=other)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    blob = bytearray((copy / "enclave.sealed").read_bytes())
    blob[100] ^= 1
    (copy / "enclave.sealed").write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        veil.load(copy, key_file=key)
    shutil.copy(folder / "enclave.sealed", copy / "enclave.sealed")
    dev = bytearray((copy / "device" / "model.safetensors").read_bytes())
    dev[-3] ^= 1
    (copy / "device" / "model.safetensors").write_bytes(bytes(dev))
    with pytest.raises(IntegrityError, match="device weights differ"):
        veil.load(copy, key_file=key)
    (copy / "enclave.sealed").write_bytes(b"VEILSEAL")
    with pytest.raises(IntegrityError, match="truncated"):
        veil.load(copy, key_file=key)


def test_protect_refuses_to_overwrite_or_store_the_key_inside(artifact, tmp_path):
    folder, key = artifact
    with pytest.raises(ConfigError, match="not empty"):
        protect("tiny-llama", "loro", folder, key_file=key)
    with pytest.raises(ConfigError, match="must not be inside"):
        protect("tiny-llama", "loro", tmp_path / "new", key_file=tmp_path / "new" / "k")


def test_cli_protect_and_generate(tmp_path):
    runner = CliRunner()
    key = tmp_path / "k"
    res = runner.invoke(app, ["protect", "tiny-gpt2", "--out", str(tmp_path / "a"), "--key-file", str(key),
                              "--set", "rank=4", "--set", "pads=fixed"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["protect", "tiny-gpt2", "--out", str(tmp_path / "b"), "--key-file", str(key),
                              "--set", "rank"])
    assert res.exit_code == 2 and "KEY=VALUE" in res.output
    res = runner.invoke(app, ["generate", "1 2 3", "--model", str(tmp_path / "a"), "--key-file",
                              str(key), "-n", "4", "--set", "device=thread"])
    assert res.exit_code == 0, res.output
    assert "[loro]" in res.output
    res = runner.invoke(app, ["generate", "1 2 3", "--model", str(tmp_path / "a"), "-n", "4"])
    assert res.exit_code == 2 and "no sealing key" in res.output


def _swap_scheme_refused(folder, scheme, key):
    """A sealed file made for one scheme cannot be passed off as another's."""
    info = folder / "veil-artifact.json"
    other = "tlg" if scheme != "tlg" else "soter"
    info.write_text(info.read_text().replace(f'"{scheme}"', f'"{other}"'))
    with pytest.raises(IntegrityError, match="authentication failed"):
        veil.load(folder, key_file=key, device="thread")


@pytest.mark.parametrize("scheme", ["tlg", "soter", "nnsplitter", "shadownet"])
def test_every_split_scheme_protects_and_runs_from_its_artifact(scheme, tmp_path):
    key = tmp_path / "k"
    folder = protect("tiny-qwen2", scheme, tmp_path / "out", key_file=key)
    assert (folder / "device" / "model.safetensors").is_file()
    with veil.load(folder, key_file=key, device="thread", record_view=True) as m, \
            veil.load("tiny-qwen2") as plain:
        assert m.scheme == scheme
        assert ([g.token_ids for g in m.generate([[1, 2, 3], [4, 5]], max_new_tokens=8)]
                == [g.token_ids for g in plain.generate([[1, 2, 3], [4, 5]], max_new_tokens=8)])
        # the device holds the obfuscated matrices only: no norms, biases or tables
        resident = m.device_view().resident
        assert resident and not any("norm" in k or k.endswith(".bias") or k.startswith("embed")
                                    for k in resident)
    with pytest.raises(ConfigError, match="unknown option.*verify"):
        veil.load(folder, key_file=key, device="thread", verify=True)
    _swap_scheme_refused(folder, scheme, key)


def test_shielded_artifact_runs_the_sealed_model_and_holds_nothing_outside(tmp_path):
    """The enclave's model is what it unsealed (a copy, wiped on close), not the caller's."""
    key = tmp_path / "k"
    folder = protect("tiny-qwen2", "shielded", tmp_path / "out", key_file=key)
    assert not (folder / "device" / "model.safetensors").exists()
    plain = veil.load("tiny-qwen2")
    m = veil.load(folder, key_file=key)
    assert m.scheme == "shielded"
    ids = [[3, 17, 99, 5, 42, 7]]
    assert float((m.logits(ids) - plain.logits(ids)).abs().max()) == 0.0
    weights = m.ops.w
    assert all(weights[k].data_ptr() != plain.ops.w[k].data_ptr() for k in weights)
    with pytest.raises(veil.UnsupportedError, match="no untrusted device"):
        m.device_view()
    m.close()
    assert all(float(t.abs().sum()) == 0 for t in weights.values())
    with pytest.raises(ConfigError, match="unknown option.*device"):
        veil.load(folder, key_file=key, device="thread")
    _swap_scheme_refused(folder, "shielded", key)
