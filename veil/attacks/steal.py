"""Model stealing with a public prior (issue #16): what the device's weights give away to someone
who holds the public checkpoint the protected model was fine-tuned from.

The low-rank peel against LoRO (beyond the LoRO paper's MSP): the device holds
W' = W + γ(BA)ᵀ for each matrix, W = W_prior + ΔW the fine-tuned weights. So
    D = W' − W_prior = ΔW + γ(BA)ᵀ,
a rank-r mask of large norm (LoRO's mask_ratio: ‖γBA‖ ≈ 5.5‖W‖) on top of a fine-tune delta
whose spectrum is small and spread. A truncated SVD of D removes the mask's r directions (r read
from the largest gap among the leading singular values) and leaves ΔW minus its share in those
directions; W_prior + (D − D_r) is the stolen matrix. No queries, no training.

MSP (LoRO's paper) against permutation obfuscation (TLG, ShadowNet's permutation + per-row
scales): `msp_unpermute` matches the device's rows and columns to the prior's by linear
assignment and refits the scales; the stolen matrix keeps the device's (fine-tuned) values.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment

import veil
from veil.data import corpus_text
from veil.eval import perplexity
from veil.model import native
from veil.model.opening import open_model
from veil.model.weights import Weights
from veil.tee.runtime import protect_loro
from veil.tee.schemes.loro import LoroConfig


def mask_rank(s: torch.Tensor, max_rank: int = 64) -> int:
    """The rank of a large low-rank mask on top of a small spread spectrum: the index of the
    largest ratio between consecutive singular values among the first `max_rank`."""
    s = s[: max_rank + 1].double()
    ratios = s[:-1] / s[1:].clamp_min(1e-30)
    return int(ratios.argmax()) + 1


@dataclass(frozen=True)
class Peeled:
    """One matrix peeled: the stolen weight, the rank removed, and (when the truth is known) how
    much of the fine-tune delta it recovered."""

    weight: torch.Tensor
    rank: int


def peel(w_device: torch.Tensor, w_prior: torch.Tensor, rank: int | None = None) -> Peeled:
    """W_prior + (D − D_r), D = W' − W_prior (see the module docstring); `rank` None: from the
    singular-value gap."""
    d = (w_device.double() - w_prior.double())
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = mask_rank(s) if rank is None else rank
    residual = d - (u[:, :r] * s[:r]) @ vh[:r]
    return Peeled((w_prior.double() + residual).float(), r)


def peel_model(device: Weights, prior: Weights, rank: int | None = None) -> tuple[Weights, dict[str, int]]:
    """The stolen model: every matrix the device holds peeled against the prior's, every other
    parameter (norms, biases, which the enclave keeps) taken from the prior. Returns the weights
    and the rank removed per matrix."""
    stolen = {k: v.clone() for k, v in prior.items()}
    ranks = {}
    for name, w in device.items():
        if name in prior and w.shape == prior[name].shape and w.dim() == 2:
            p = peel(w, prior[name], rank)
            stolen[name], ranks[name] = p.weight, p.rank
    return stolen, ranks


def delta_recovered(stolen: torch.Tensor, prior: torch.Tensor, victim: torch.Tensor) -> float:
    """The share of the fine-tune delta's energy recovered: 1 − ‖ΔW_stolen − ΔW‖² / ‖ΔW‖²."""
    delta = (victim.double() - prior.double())
    err = (stolen.double() - victim.double())
    return 1.0 - float(err.pow(2).sum() / delta.pow(2).sum().clamp_min(1e-30))


def evaluate_peel(victim: str, prior: str = "default", window: int = 64, windows: int = 16,
                  scratch: Path | None = None) -> dict[str, Any]:
    """Protect `victim` with LoRO's defaults, peel its device weights against `prior`, and score
    prior, victim and stolen model on the held-out Shakespeare split (perplexity, top-1), with
    the share of the fine-tune delta's energy recovered per matrix."""
    pri, vic = open_model(prior), open_model(victim)
    _, device = protect_loro(vic.cfg, vic.weights, LoroConfig())
    stolen, ranks = peel_model(device, pri.weights)
    recovered = [delta_recovered(stolen[n], pri.weights[n], vic.weights[n]) for n in ranks]
    folder = Path(tempfile.mkdtemp(prefix="veil-stolen-")) if scratch is None else scratch
    try:
        native.save_native(folder / "stolen", pri.cfg, stolen, pri.folder)
        scores = {}
        with veil.load(prior) as p:
            held = p.encode(corpus_text("shakespeare", "heldout")[:200_000])
        for name, src in (("prior", prior), ("victim", victim), ("stolen", str(folder / "stolen"))):
            with veil.load(src) as m:
                r = perplexity(m, held, window, windows)
                scores[name] = {"ppl": r.perplexity, "top1": r.top1_accuracy}
    finally:
        if scratch is None:
            shutil.rmtree(folder, ignore_errors=True)
    gain = scores["victim"]["top1"] - scores["prior"]["top1"]
    return {"scores": scores, "ranks": sorted(set(ranks.values())),
            "delta_recovered_median": statistics.median(recovered),
            "delta_recovered_min": min(recovered),
            "gain_stolen": (scores["stolen"]["top1"] - scores["prior"]["top1"]) / gain if gain else 0.0}


@dataclass(frozen=True)
class Unpermuted:
    """MSP on one matrix: the device's rows and columns matched to the prior's, and the
    per-row scales (ShadowNet) re-estimated against the prior by least squares."""

    weight: torch.Tensor          # the stolen matrix, in the prior's row/column order
    perm_out: torch.Tensor        # device row i holds true row perm_out[i]
    perm_in: torch.Tensor         # device column j holds true column perm_in[j]


def _match(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each row of `a`, the row of `b` it is assigned to (max total cosine, one-to-one)."""
    an = a.double() / a.double().norm(dim=1, keepdim=True).clamp_min(1e-30)
    bn = b.double() / b.double().norm(dim=1, keepdim=True).clamp_min(1e-30)
    _, cols = linear_sum_assignment(-(an @ bn.T).numpy())
    return torch.as_tensor(cols, dtype=torch.long)


def msp_unpermute(w_device: torch.Tensor, w_prior: torch.Tensor, rounds: int = 3) -> Unpermuted:
    """LoRO's MSP against permutation (TLG) and permutation-plus-scale (ShadowNet) obfuscation:
    rows matched first by a signature a column permutation and a row scale cannot change (each
    row's entries sorted, after dividing by the row's norm), then columns by cosine against the
    prior with the rows in place, then rows again by cosine — each a linear assignment. The
    stolen matrix takes the device's values (the fine-tune), rescaled so that each row fits the
    prior's row in least squares."""
    wd = w_device.double()
    wp = w_prior.double()
    sig_d = (wd / wd.norm(dim=1, keepdim=True).clamp_min(1e-30)).sort(dim=1).values
    sig_p = (wp / wp.norm(dim=1, keepdim=True).clamp_min(1e-30)).sort(dim=1).values
    perm_out = _match(sig_d, sig_p)                       # device row i → true row perm_out[i]
    for _ in range(rounds):
        rows = torch.empty_like(wd)
        rows[perm_out] = wd                               # true row order, columns still permuted
        perm_in = _match(rows.T, wp.T)                    # device column j → true column
        cols = torch.empty_like(wd)
        cols[:, perm_in] = wd
        new_out = _match(cols, wp)
        if torch.equal(new_out, perm_out):
            break
        perm_out = new_out
    aligned = torch.empty_like(wd)
    aligned[perm_out[:, None], perm_in[None, :]] = wd
    scale = (aligned * wp).sum(1, keepdim=True) / aligned.pow(2).sum(1, keepdim=True).clamp_min(1e-30)
    return Unpermuted((aligned * scale).float(), perm_out, perm_in)
