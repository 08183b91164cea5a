"""The low-rank peel (issue #16): LoRO's device weights minus the public prior, the mask's rank
read off the singular-value gap and removed — the fine-tune delta comes back."""

from __future__ import annotations

import pytest
import torch

from veil.attacks.steal import delta_recovered, mask_rank, peel_model
from veil.model import zoo
from veil.tee.runtime import protect_loro
from veil.tee.schemes.loro import LoroConfig


def _victim(preset: str, scale: float = 0.05, seed: int = 1):
    """A tiny prior and a 'fine-tuned' victim: every matrix moved by a full-rank delta of
    `scale` × its norm (a fine-tune's delta is spread, not low-rank)."""
    cfg = zoo.preset(preset)
    prior = zoo.random_weights(cfg, 0)
    g = torch.Generator().manual_seed(seed)
    victim = {}
    for k, w in prior.items():
        d = torch.randn(w.shape, generator=g)
        victim[k] = w + scale * d * (w.norm() / d.norm()) if w.dim() == 2 else w.clone()
    return cfg, prior, victim


def test_the_peel_recovers_the_fine_tune_delta_under_loro():
    cfg, prior, victim = _victim("tiny-llama")
    _, device = protect_loro(cfg, victim, LoroConfig())
    stolen, ranks = peel_model(device, prior)
    assert set(ranks.values()) == {LoroConfig().rank}          # the gap names the mask's rank
    for n in ranks:
        # an isotropic delta loses its share in the mask's row and column spaces with them:
        # r/m + r/n − r²/(mn) of its energy (on the default model's shapes: ~2%)
        m, k, r = *victim[n].shape, ranks[n]
        expected = 1 - (r / m + r / k - r * r / (m * k))
        assert delta_recovered(stolen[n], prior[n], victim[n]) > expected - 0.05, n
        # the device's weight itself is nowhere near the victim's
        assert (device[n] - victim[n]).norm() > 3 * (victim[n] - prior[n]).norm()


def test_mask_rank_reads_the_gap():
    s = torch.tensor([90.0, 80, 70, 1.0, 0.9, 0.8, 0.7])
    assert mask_rank(s) == 3


@pytest.mark.parametrize("scheme", ["tlg", "shadownet"])
def test_msp_undoes_permutations_and_scales(scheme):
    """MSP with the public prior: every matrix's row and column permutations recovered (≥ 99%),
    and the stolen matrix is the victim's up to the (least-squares) scales."""
    from veil.attacks.steal import msp_unpermute
    from veil.csprng import SecretRng
    from veil.tee.schemes.baselines import protect_baseline

    cfg, prior, victim = _victim("tiny-llama")
    device, obf, _ = protect_baseline(scheme, cfg, victim, 0.0, 0.01, SecretRng(bytes(32)))
    for n, o in obf.items():
        got = msp_unpermute(device[f"{n}.weight"], prior[f"{n}.weight"])
        assert float((got.perm_out == o.perm_out).double().mean()) >= 0.99, n
        assert float((got.perm_in == o.perm_in).double().mean()) >= 0.99, n
        assert delta_recovered(got.weight, prior[f"{n}.weight"], victim[f"{n}.weight"]) > 0.8, n
