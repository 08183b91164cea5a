"""Sealed enclave secrets: round trip, and refusal of anything tampered, truncated or mis-keyed."""

from __future__ import annotations

import pytest
import torch

from veil.errors import ConfigError, IntegrityError
from veil.tee.sealing import KEY_ENV, new_key, read_key, seal, unseal, write_key


def _secrets():
    return {"layers.0.B": torch.randn(8, 2), "perm": torch.randperm(16)}


def test_round_trip_with_metadata():
    key = new_key()
    blob = seal(_secrets(), key, "loro/enclave", meta={"rank": 2})
    back, meta = unseal(blob, key, "loro/enclave")
    assert meta == {"rank": 2}
    for k, v in _secrets().items():
        assert back[k].shape == v.shape
    s = _secrets()
    assert all(torch.equal(unseal(seal(s, key, "p"), key, "p")[0][k], s[k]) for k in s)


@pytest.mark.parametrize("attack", ["flip", "truncate", "wrong_key", "other_purpose", "garbage"])
def test_tampering_is_refused(attack):
    key = new_key()
    blob = seal(_secrets(), key, "loro/enclave")
    use_key, purpose = key, "loro/enclave"
    if attack == "flip":
        blob = blob[:40] + bytes([blob[40] ^ 1]) + blob[41:]
    elif attack == "truncate":
        blob = blob[:-10]
    elif attack == "wrong_key":
        use_key = new_key()
    elif attack == "other_purpose":
        purpose = "tlg/enclave"
    else:
        blob = b"\x00" * 20
    with pytest.raises(IntegrityError):
        unseal(blob, use_key, purpose)


def test_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match="no sealing key"):
        read_key()
    key = write_key(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert read_key(tmp_path / "k") == key
    monkeypatch.setenv(KEY_ENV, key.hex())
    assert read_key() == key
    (tmp_path / "bad").write_text("abcd")
    with pytest.raises(ConfigError, match="32 bytes"):
        read_key(tmp_path / "bad")
    with pytest.raises(ConfigError, match="cannot read"):
        read_key(tmp_path / "missing")


def _tensors_of(obj) -> list[torch.Tensor]:
    """Every tensor reachable from a secret class (dataclass fields, dicts, lists, tuples)."""
    import dataclasses

    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in _tensors_of(getattr(obj, f.name))]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors_of(obj[k])]
    if isinstance(obj, (list, tuple, set)):
        items = sorted(obj, key=str) if isinstance(obj, set) else obj
        return [t for x in items for t in _tensors_of(x)]
    return []


@pytest.mark.parametrize("scheme", ["loro", "loro-direct", "tlg", "soter", "nnsplitter",
                                    "shadownet", "shielded"])
def test_every_secret_class_round_trips_through_a_sealed_file(scheme):
    """What each scheme's `protect` makes comes back from a sealed file equal, field by field."""
    from veil.model.opening import open_model
    from veil.schemes import get

    name, options = (("loro", {"bank": 0}) if scheme == "loro-direct" else (scheme, {}))
    s = get(name)
    secrets_ = s.protect(open_model("tiny-gpt2"), s.options.parse(name, options)).secrets
    tensors, meta = secrets_.to_sealable()
    key = new_key()
    back_t, back_meta = unseal(seal(tensors, key, f"{name}/enclave", meta), key, f"{name}/enclave")
    back = type(secrets_).from_sealed(back_t, back_meta)
    mine, theirs = _tensors_of(secrets_), _tensors_of(back)
    assert mine and len(mine) == len(theirs)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert back.to_sealable()[1] == meta
