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
from dataclasses import dataclass, field
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


def mask_rank(s: torch.Tensor, max_rank: int = 256) -> int:
    """The rank of a large low-rank mask on top of a small spread spectrum: the index of the
    largest ratio between consecutive singular values among the first `max_rank` (at most half
    the spectrum: a thin matrix's last values fall off on their own)."""
    s = s[: min(max_rank, len(s) // 2) + 1].double()
    # below float32's resolution of the largest value a singular value is rounding, not data:
    # an exactly low-rank D ends in a gap to that floor
    s = s.clamp_min(float(s[0]) * 1e-6)
    ratios = s[:-1] / s[1:]
    return int(ratios.argmax()) + 1


@dataclass(frozen=True)
class Peeled:
    """One matrix peeled: the stolen weight, the rank removed, and (when the truth is known) how
    much of the fine-tune delta it recovered."""

    weight: torch.Tensor
    rank: int
    # the directions removed (out × r, in × r): where the mask is — and, under a delta mask,
    # where the fine-tune changed the matrix most
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None


def peel(w_device: torch.Tensor, w_prior: torch.Tensor, rank: int | None = None) -> Peeled:
    """W_prior + (D − D_r), D = W' − W_prior (see the module docstring); `rank` None: from the
    singular-value gap."""
    d = (w_device.double() - w_prior.double())
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = mask_rank(s) if rank is None else rank
    residual = d - (u[:, :r] * s[:r]) @ vh[:r]
    return Peeled((w_prior.double() + residual).float(), r, u[:, :r].float(), vh[:r].t().float())


def peel_model(device: Weights, prior: Weights, rank: int | None = None) -> tuple[Weights, dict[str, int]]:
    """The stolen model: every matrix the device holds peeled against the prior's, every other
    parameter (norms, biases, which the enclave keeps) taken from the prior (`msp_model` for
    loro). Returns the weights and the rank removed per matrix."""
    stolen = msp_model("loro", device, prior, rank)
    return stolen.weights, {n: u.shape[1] for n, (u, _) in stolen.subspaces.items()}


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


def _unit_rows(a: torch.Tensor) -> torch.Tensor:
    a = a.double()
    return a / a.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _match(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each row of `a`, the row of `b` it is assigned to (max total cosine, one-to-one)."""
    _, cols = linear_sum_assignment(-(_unit_rows(a) @ _unit_rows(b).T).numpy())
    return torch.as_tensor(cols, dtype=torch.long)


def msp_unpermute(w_device: torch.Tensor, w_prior: torch.Tensor, rounds: int = 3,
                  rescale: bool = True) -> Unpermuted:
    """LoRO's MSP against permutation (TLG) and permutation-plus-scale (ShadowNet) obfuscation:
    rows matched first by a signature a column permutation and a row scale cannot change (each
    row's entries sorted, after dividing by the row's norm), then columns by cosine against the
    prior with the rows in place, then rows again by cosine — each a linear assignment. The
    stolen matrix takes the device's values (the fine-tune), rescaled so that each row fits the
    prior's row in least squares."""
    wd = w_device.double()
    wp = w_prior.double()
    # device row i → true row perm_out[i]
    perm_out = _match(_unit_rows(wd).sort(dim=1).values, _unit_rows(wp).sort(dim=1).values)
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
    if not rescale:         # TLG: no scales to undo, the device's values are the victim's
        return Unpermuted(aligned.float(), perm_out, perm_in)
    scale = (aligned * wp).sum(1, keepdim=True) / aligned.pow(2).sum(1, keepdim=True).clamp_min(1e-30)
    return Unpermuted((aligned * scale).float(), perm_out, perm_in)


def msp_rescale(w_device: torch.Tensor, w_prior: torch.Tensor) -> torch.Tensor:
    """MSP against one secret scalar per matrix (SOTER): W'·μ̂, μ̂ = ⟨W', W_prior⟩ / ‖W'‖², the
    least-squares fit of the device's matrix to the prior's (sign included)."""
    wd = w_device.double()
    mu = float((wd * w_prior.double()).sum() / wd.pow(2).sum().clamp_min(1e-30))
    return (wd * mu).float()


def msp_reset_outliers(w_device: torch.Tensor, w_prior: torch.Tensor, z: float = 8.0
                       ) -> tuple[torch.Tensor, int]:
    """MSP against sparse noise (NNSplitter): entries where |W' − W_prior| is an outlier — more
    than `z` robust standard deviations (1.4826 × the median absolute difference) — are reset to
    the prior's value; the rest keep the device's (fine-tuned) value. Returns the matrix and the
    number of entries reset."""
    d = (w_device.double() - w_prior.double())
    sigma = 1.4826 * float(d.abs().median()) + 1e-12
    out = d.abs() > z * sigma
    stolen = torch.where(out, w_prior.double(), w_device.double())
    return stolen.float(), int(out.sum())


# What MSP does to a matrix on the device, per scheme (the scheme is public: Kerckhoffs).
# Matrices the device does not hold (kept in the enclave) are taken from the prior.
MSP_METHODS = {"tlg": "unpermute", "shadownet": "unpermute+rescale", "soter": "rescale",
               "nnsplitter": "reset outliers", "loro": "low-rank peel", "shielded": "prior"}


@dataclass
class Stolen:
    """A whole stolen model: its weights (the prior's where the device showed nothing) and, per
    matrix taken from the device, how it was recovered."""

    weights: Weights
    method: dict[str, str]
    subspaces: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def msp_model(scheme: str, resident: dict[str, torch.Tensor], prior: Weights,
              peel_rank: int | None = None) -> Stolen:
    """MSP (LoRO's paper; the peel for LoRO) over everything the device holds: every matrix of
    `resident` that has the prior's name and shape is recovered by the scheme's method, every
    other parameter is the prior's."""
    if scheme not in MSP_METHODS:
        raise ValueError(f"no MSP for scheme {scheme!r} (known: {', '.join(MSP_METHODS)})")
    stolen = {k: v.clone() for k, v in prior.items()}
    method: dict[str, str] = {}
    subspaces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, w in resident.items():
        if name not in prior or w.shape != prior[name].shape or w.dim() != 2:
            continue
        p = prior[name]
        if scheme == "loro" and peel_rank == 0:       # nothing masked: the weights as they are
            stolen[name], method[name] = w.clone(), "as held"
        elif scheme == "loro":
            peeled = peel(w, p, peel_rank)
            stolen[name], method[name] = peeled.weight, f"peel r={peeled.rank}"
            subspaces[name] = (peeled.u, peeled.v)
        elif scheme in ("tlg", "shadownet"):
            u = msp_unpermute(w, p, rescale=scheme == "shadownet")
            stolen[name], method[name] = u.weight, MSP_METHODS[scheme]
        elif scheme == "soter":
            stolen[name], method[name] = msp_rescale(w, p), "rescale"
        elif scheme == "nnsplitter":
            stolen[name], k = msp_reset_outliers(w, p)
            method[name] = f"reset {k}"
    return Stolen(stolen, method, subspaces)


def rows_in_place(stolen: torch.Tensor, victim: torch.Tensor) -> tuple[float, float]:
    """The share of the stolen matrix's rows, and of its columns, whose most similar (cosine)
    row/column of the victim's matrix is the one at the same index: 1.0 when every permutation
    was undone."""
    def share(a: torch.Tensor, b: torch.Tensor) -> float:
        best = (_unit_rows(a) @ _unit_rows(b).T).argmax(dim=1)
        return float((best == torch.arange(len(a))).double().mean())
    return share(stolen, victim), share(stolen.T, victim.T)


def subspace_from_others(subspaces: dict[str, tuple[torch.Tensor, torch.Tensor]],
                         others: int = 4) -> dict[str, float]:
    """Factor multiplexing: how much of each matrix's mask subspace (the peel's removed input
    directions V, and output directions U) lies in the span of `others` other matrices' of the
    same dimension — the mean of both sides' shares, per matrix. With LoRO's shared bank of m
    factors per dimension every mask of that dimension lives in one m·r-dimensional span, so m
    other peels predict a matrix's mask whole (share ≈ 1); with independent factors the share
    is what chance gives, ≈ others·r / dim."""
    def side(idx: int) -> dict[str, float]:
        by_dim: dict[int, list[str]] = {}
        for n, uv in subspaces.items():
            by_dim.setdefault(uv[idx].shape[0], []).append(n)
        got = {}
        for dim, names in by_dim.items():
            for i, n in enumerate(names):
                rest = [names[(i + j) % len(names)] for j in range(1, min(others, len(names) - 1) + 1)]
                if not rest:
                    continue
                q, _ = torch.linalg.qr(torch.cat([subspaces[m][idx].double() for m in rest], 1))
                x = subspaces[n][idx].double()
                got[n] = float((q.T @ x).pow(2).sum() / x.pow(2).sum())
        return got
    u, v = side(0), side(1)
    return {n: (u[n] + v[n]) / 2 for n in u if n in v}
