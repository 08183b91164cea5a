"""The low-rank peel (issue #16): LoRO's device weights minus the public prior, the mask's rank
read off the singular-value gap and removed — the fine-tune delta comes back."""

from __future__ import annotations

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
