"""Shared fixtures: tiny random models of every family saved as HF folders, and the default model."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from veil.model import zoo
from veil.model.config import PRESETS, hf_config_dict
from veil.variants.merge import calibrate, student_weights, variant_config

FAMILIES = ("tiny-llama", "tiny-qwen2", "tiny-gpt2")
MPC_DIR = Path(__file__).parent / "mpc"


def pytest_collection_modifyitems(items):
    """Markers by rule: everything under tests/mpc/ runs SPU (`mpc`); SPU and the default model
    are slow. `./run test -m "not slow"` is the quick subset."""
    for item in items:
        if MPC_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.mpc)
        if item.get_closest_marker("mpc") or item.get_closest_marker("default_model"):
            item.add_marker(pytest.mark.slow)


def make_hf_model(preset: str, seed: int = 0):
    """A transformers model of a preset's shape with spread-out random weights."""
    import transformers

    cfg = PRESETS[preset]
    d = hf_config_dict(cfg)
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # big enough that greedy choices are not near-ties
            scale = 0.3 if "wte" in name or "embed" in name else 0.12
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name or "ln" in name
                        else 0.05 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_hf(request, tmp_path_factory) -> tuple[str, Path, object]:
    """(preset name, HF folder, transformers model) for each family."""
    model = make_hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, folder, model


@pytest.fixture(scope="session")
def default_folder() -> Path:
    from veil.model import zoo

    return zoo.resolve("default")


@pytest.fixture(scope="session")
def default_model(default_folder):
    import veil

    return veil.load("default")


@contextmanager
def port_taken_on_first_pick(rank: int):
    """A port picker for the MPC launchers whose first pick hands rank `rank` (−1: the last) a
    port another socket is listening on — taken between picking and binding; later picks are
    fresh. Yields (pick, picks): the picker and the sizes it was asked for."""
    from veil.mpc.cluster import free_ports

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken, picks = squatter.getsockname()[1], []

        def pick(n: int) -> list[int]:
            picks.append(n)
            ports = free_ports(n)
            if len(picks) == 1:
                ports[rank] = taken
            return ports
        yield pick, picks


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def assert_logits_close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """The one tolerance check: max |Δlogit| of `got` against the reference `ref` within `tol`
    (inclusive; 0 means bit-identical). Returns the error."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = max_abs(got, ref)
    assert err <= tol, f"max |Δlogit| {err:.3g} > {tol:.3g}"
    return err


def student(preset: str, variant: str = "merge", context: int = 32, seed: int = 0,
            calibrated: bool = True):
    """A MERGE-variant student of a tiny preset (config, weights), its tables perturbed."""
    base = zoo.preset(preset)
    w = zoo.random_weights(base, seed)
    cfg = variant_config(base, variant, context)
    ids = torch.randint(0, base.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    calib = calibrate(base, w, [ids], context) if calibrated else None
    sw = student_weights(base, w, cfg, calib)
    g = torch.Generator().manual_seed(seed + 1)
    # a trained table is far from the uniform init: make the test see real mixing
    return cfg, {k: v + 0.5 * torch.randn(v.shape, generator=g) if k.endswith("const") else v
                 for k, v in sw.items()}

