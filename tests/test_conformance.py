"""One conformance suite over the scheme registry: a scheme is covered by registering it.

Every scheme, on the tiny llama / qwen2 / gpt2 presets: plain's greedy tokens (on a padded batch)
and logits within the tolerance it declares; unsupported variants refused with `UnsupportedError`
naming the op and the scheme before any thread or process starts; options checked by name and
type; and, for schemes with an untrusted device, its `veil explain` rows agree with the device
view it records. MPC schemes (SPU's simulator) give tokens only: they offer no per-call logits
(their logits are checked against plain in tests/mpc).
"""

from __future__ import annotations

import fnmatch
import os
import threading
import types
import typing
from dataclasses import fields

import pytest
import torch

import veil
from conftest import FAMILIES, assert_logits_close, student
from veil.backends.plain import TorchOps
from veil.model import native, zoo
from veil.model.ops import VARIANT_KNOBS
from veil.schemes import SCHEMES
from veil.schemes.base import DeviceViewing, FixedLengthSession
from veil.variants.merge import merge

IDS = [[3, 17, 99, 5, 42, 7, 250, 11, 64, 2, 9, 130]]
PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11]]
STEP = [s for s in SCHEMES.values() if s.kind in ("host", "tee")]   # tests/he covers he
MPC = [s for s in SCHEMES.values() if s.kind == "mpc"]


def _load(model, scheme, **options):
    if SCHEMES[scheme].kind == "mpc":
        options = {"parties": "sim", "timeout_s": 120, **options}
        with pytest.warns(UserWarning, match="dealer"):
            return veil.load(model, scheme=scheme, **options)
    return veil.load(model, scheme=scheme, **options)


@pytest.fixture(scope="module")
def merge_model(tmp_path_factory):
    """A tiny MERGE model (merged gpt2 student): what scheme 'merge' runs."""
    cfg, w = merge(*student("tiny-gpt2", calibrated=False))
    return native.save_native(tmp_path_factory.mktemp("merge") / "m", cfg, w)


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("name", [s.name for s in STEP])
def test_matches_plain(name, preset):
    s = SCHEMES[name]
    with veil.load(preset) as plain, _load(preset, name) as m:
        # the scheme promises no variant its executor cannot run
        assert all(s.support[op] <= m.ops.support[op] for op in s.support), name
        assert_logits_close(m.logits(IDS), plain.logits(IDS), s.tolerance.tiny)
        got = [g.token_ids for g in m.generate(PROMPTS, max_new_tokens=12)]
        ref = [g.token_ids for g in plain.generate(PROMPTS, max_new_tokens=12)]
        assert got == ref


@pytest.fixture(scope="module")
def variant_models(tmp_path_factory):
    """MERGE-variant students of tiny-gpt2 (constant attention, quad, affine norm; with and without
    embedding resending), as veil model folders."""
    root = tmp_path_factory.mktemp("variants")
    return {v: native.save_native(root / v, *student("tiny-gpt2", v, calibrated=False))
            for v in ("only-mm", "merge")}


@pytest.mark.parametrize("variant", ["only-mm", "merge"])
@pytest.mark.parametrize("name", [s.name for s in STEP])
def test_every_claimed_variant_matches_plain(name, variant, variant_models):
    """A support table is a promise: wherever a scheme claims a MERGE variant, it runs it
    exactly; where it does not, it refuses it (above)."""
    s = SCHEMES[name]
    folder = variant_models[variant]
    with veil.load(folder) as plain:
        cfg = plain.cfg
        if not all(getattr(cfg, VARIANT_KNOBS[op]) in s.support[op] for op in s.support):
            with pytest.raises(veil.UnsupportedError, match=name):
                veil.load(folder, scheme=name)
            return
        with _load(folder, name) as m:
            ids = [IDS[0][:8]]
            assert_logits_close(m.logits(ids), plain.logits(ids), s.tolerance.tiny)
            got = m.generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True).token_ids
            assert got == plain.generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True).token_ids


@pytest.mark.mpc
@pytest.mark.slow
@pytest.mark.parametrize("name", [s.name for s in MPC])
def test_mpc_schemes_match_plain(name, merge_model):
    model = merge_model if name == "merge" else "tiny-llama"
    with veil.load(model) as plain, _load(model, name) as m:
        assert isinstance(m.session, FixedLengthSession)
        ref = plain.generate([3, 17, 99, 5], max_new_tokens=4, ignore_eos=True).token_ids
        assert m.generate([3, 17, 99, 5], max_new_tokens=4, ignore_eos=True).token_ids == ref


# the knobs a variant cannot go without: a polynomial needs its coefficients (and range)
VARIANT_NEEDS = {("activation", "poly"): {"poly": (0.145, 0.5, 0.126), "act_bound": 4.0},
                 ("norm", "poly"): {"norm_poly": (2.0, -1.5, 0.4), "norm_lo": 0.25,
                                    "norm_hi": 4.0}}


def _variants(preset: str):
    """(op, value, config) for every variant plain runs, applied to a tiny preset."""
    base = zoo.preset(preset)
    for op, values in TorchOps.support.items():
        for value in sorted(values):
            knob = VARIANT_KNOBS[op]
            if getattr(base, knob) != value:
                yield op, value, base.with_(**{knob: value, **VARIANT_NEEDS.get((op, value), {})})


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                    out.add(int(pid))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _base_preset(s) -> str:
    """A tiny preset the scheme runs, so each variant below changes one knob it may refuse."""
    for preset in ("tiny-llama", "tiny-power"):
        cfg = zoo.preset(preset)
        if all(getattr(cfg, VARIANT_KNOBS[op]) in s.support[op] for op in s.support):
            return preset
    raise AssertionError(f"{s.name} runs no tiny preset")


@pytest.mark.parametrize("name", list(SCHEMES))
def test_refuses_unsupported_variants_before_starting_anything(name, tmp_path):
    s = SCHEMES[name]
    refused = 0
    for op, value, cfg in _variants(_base_preset(s)):
        if value in s.support[op]:
            continue
        folder = native.save_native(tmp_path / f"{op}-{value}", cfg, zoo.random_weights(cfg))
        threads, children = threading.active_count(), _children()
        with pytest.raises(veil.UnsupportedError, match=f"{name}.*{op}={value!r}"):
            veil.load(folder, scheme=name)
        assert threading.active_count() == threads and _children() == children
        refused += 1
    # the table is not vacuous: a scheme either refuses something or runs every variant
    assert refused or all(s.support[op] >= v for op, v in TorchOps.support.items())


def test_merge_refuses_a_vanilla_model_before_starting_anything():
    threads, children = threading.active_count(), _children()
    with pytest.raises(veil.UnsupportedError, match="merge.*MERGE model"):
        veil.load("tiny-gpt2", scheme="merge", parties="local")
    assert threading.active_count() == threads and _children() == children


_WRONG = {bool: "maybe", int: "abc", float: "fast", str: 12345}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_options_checked_by_name_and_type(name):
    s = SCHEMES[name]
    with pytest.raises(veil.ConfigError, match=f"{name}: unknown option.*colour"):
        veil.load("tiny-llama", scheme=name, colour="blue")
    hints = typing.get_type_hints(s.options)
    for f in fields(s.options):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
        wrong = _WRONG.get(inner, "not-a-choice" if typing.get_origin(inner) is typing.Literal
                           else "x")
        with pytest.raises(veil.ConfigError, match=f"{name}: option {f.name!r} expects"):
            veil.load("tiny-llama", scheme=name, **{f.name: wrong})


def _claimed(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@pytest.mark.parametrize("name", [s.name for s in STEP])
def test_explain_rows_agree_with_the_recorded_device_view(name):
    s = SCHEMES[name]
    rows = s.placement
    for row in rows:      # a row that says the device gets nothing claims nothing of its view
        assert not row.holds or row.device_holds != "—", row
        assert not row.receives or row.device_receives != "—", row
    seen: set[str] = set()
    records = "record_view" in {f.name for f in fields(s.options)}
    for preset in FAMILIES:
        with _load(preset, name, **({"record_view": True} if records else {})) as m:
            if not isinstance(m.session, DeviceViewing):
                assert all(not r.holds and not r.receives for r in rows)
                with pytest.raises(veil.UnsupportedError, match="no untrusted device"):
                    m.device_view()
                return
            m.generate(PROMPTS, max_new_tokens=3)
            view = m.device_view()
        names = list(view.resident) + [n for n, _ in view.received]
        seen.update(names)
        unclaimed = [n for n in view.resident if not any(_claimed(n, r.holds) for r in rows)]
        unclaimed += [n for n, _ in view.received
                      if not any(_claimed(n, r.receives) for r in rows)]
        assert not unclaimed, f"{name} on {preset}: no explain row says the device has {unclaimed[:5]}"
    stale = [r.op for r in rows if (r.holds or r.receives)
             and not any(_claimed(n, r.holds + r.receives) for n in seen)]
    assert not stale, f"{name}: explain rows claim what the device never had: {stale}"


def test_every_scheme_is_listed_by_the_cli():
    from typer.testing import CliRunner

    from veil.cli import app

    res = CliRunner().invoke(app, ["schemes"])
    assert res.exit_code == 0
    for name in SCHEMES:
        assert name in res.output


def test_readme_scheme_table_is_the_registry():
    from pathlib import Path

    from veil.schemes import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- schemes:start -->\n", 1)[1].split("<!-- schemes:end -->", 1)[0]
    assert block == markdown_table(), "README's scheme table: run `veil schemes --markdown`"


def test_model_uses_declared_capabilities_only():
    """Plain has no device; step sessions give logits; a closed model says so."""
    with veil.load("tiny-llama") as m:
        assert not isinstance(m.session, DeviceViewing)
        assert m.logits(IDS).shape == (1, len(IDS[0]), m.cfg.vocab_size)
    with pytest.raises(veil.InputError, match="closed"):
        m.generate([1, 2], max_new_tokens=1)
    with veil.load("tiny-gpt2", scheme="tlg") as m:
        assert torch.is_tensor(m.logits(IDS))
