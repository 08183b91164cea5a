"""LoRO: low-rank dense masks on the device's weights, removed cheaply by the enclave.

Threat model: the device (OS, accelerator, memory) is the attacker and holds the public pretrained
prior; only the TEE is trusted; LoRO protects the owner's (fine-tuned) weights.

Protocol, per weight matrix W (out×in) — every linear, and the embedding tables used as lookups:
  1. Offline (protect, in the TEE): secret B (in×r), A (r×out), scale γ; the device gets
     W' = W + γ(BA)ᵀ. Biases and norm weights stay in the enclave.
  2. Online: the enclave sends x̃ = x + s·g: g a fresh unit-Gaussian row per input row and layer,
     s = pad_ratio × the row's RMS rounded up to a power of two (so the device learns each row's
     RMS within a factor of 2, and nothing of its direction);
     the device returns ỹ = x̃W'ᵀ; meanwhile the enclave computes c = γ(xB)A; then
     y = ỹ − c − s·(g·W'ᵀ) + b, with g·W'ᵀ precomputed offline and kept sealed on the device,
     which returns it with ỹ (veil/tee/pads.py). Exact up to rounding.
  3. Embedding rows come back as E'[i] = E[i] + γ(B A[:, i])ᵀ; the enclave subtracts that.
  4. Attention runs on the device under secret head-block permutations (veil/tee/enclave.py).
  5. Factor multiplexing: a small bank of cornerstone factors per dimension; each matrix's B and A
     are secret random combinations of the bank, so resident secrets stay tiny.
  6. (veil's hardening, `mask="delta"`, off by default) For a model fine-tuned from a public
     prior, random masks fall to the low-rank peel (veil/attacks/steal.py: W' − W_prior's top-r
     directions are the mask, the rest is the fine-tune). A delta mask spans the top-r singular
     subspaces of the fine-tune delta W − W_prior instead, so the peel takes the delta's largest
     directions away with the mask; what the device still gives away is the delta beyond rank r,
     and those subspaces themselves (docs/attacks.md has the measured trade-off).
Follows LoRO (NeurIPS 2025). Deliberate differences: pads are fresh per row (the public code reuses
one pad per layer; `pads="fixed"` keeps that mode so attacks can show what reuse costs); pad and
mask scales are set relative to the row / the weight (the public code draws entries in [0, 0.1)
whatever the data — LLM activations have rows ~100× the others, "attention sinks", which a fixed
scale either leaves nearly unpadded or, sized for them, drowns every other row in rounding error);
nonlinear ops never run on the device; attention inputs are mixed by orthogonal matrices, not
only permuted (see veil/tee/enclave.py). Precision: ỹ carries terms ~(1+mask_ratio)(1+pad_ratio)
times larger than y, computed in the device's float32, so logits differ from plain by ~1e-3–1e-2
on the default model (tiny models ~1e-5); the enclave's pad term and the final cancellation run in
float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from veil.csprng import SecretRng
from veil.errors import ConfigError
from veil.model.config import ModelConfig
from veil.model.weights import Weights
from veil.tee.mixing import HeadMixing, seal_mixings, unseal_mixings
from veil.tee.pads import PadCost, PadPool
from veil.tee.placement import available_cpus, enclave_threads


@dataclass(frozen=True)
class LoroConfig:
    """LoRO's public settings (what `veil protect` records beside the sealed secrets)."""

    rank: int = 8
    # cornerstone factors per dimension; 0 = independent factors per matrix; None: 4 for random
    # masks, 0 for delta masks (each matrix's own subspace)
    bank: int | None = None
    mask_ratio: float = 5.5  # ‖γBA‖_F / ‖W‖_F (cos(W', W) ≈ 1/√(1+r²) ≈ 0.18)
    pad_ratio: float = 5.5   # pad-row RMS ≥ pad_ratio × input-row RMS (cos ≤ 1/√(1+r²) ≈ 0.18)
    pads: Literal["fresh", "fixed"] = "fresh"
    # head-block transforms of Q/K/V: Haar rotations, or permutations only (the paper's)
    attention_mixing: Literal["rotate", "permute"] = "rotate"
    # "random": Gaussian factors (the paper's). veil's hardenings against the low-rank peel
    # (veil/attacks/steal.py), for a model fine-tuned from `prior` (the public checkpoint):
    # "delta": each mask spans the top-`rank` singular subspaces of the matrix's fine-tune delta
    # W − W_prior; "offload": the "mask" is minus the delta's rank-`rank` truncation, so the
    # device holds W_prior + (ΔW − ΔW_r) — the prior itself for a LoRA fine-tune of rank ≤ r —
    # and the enclave adds ΔW_r back (no large random mask: no precision lost either)
    mask: Literal["random", "delta", "offload"] = "random"
    prior: str | None = None

    def __post_init__(self) -> None:
        for name, ok, need in (("rank", self.rank >= 1, "≥ 1"),
                               ("bank", self.bank is None or self.bank >= 0, "≥ 0"),
                               ("mask_ratio", self.mask_ratio > 0, "> 0"),
                               ("pad_ratio", self.pad_ratio > 0, "> 0")):
            if not ok:
                raise ConfigError(f"option {name!r} must be {need}, got {getattr(self, name)}")
        if self.pads not in ("fresh", "fixed"):
            raise ConfigError(f"option 'pads' must be 'fresh' or 'fixed', got {self.pads!r}")
        if self.mask not in ("random", "delta", "offload"):
            raise ConfigError("option 'mask' must be 'random', 'delta' or 'offload', got "
                              f"{self.mask!r}")
        if self.mask != "random" and not self.prior:
            raise ConfigError(f"option mask={self.mask!r} needs option 'prior': the public "
                              "checkpoint the protected model was fine-tuned from (e.g. "
                              "prior=default)")
        if self.mask != "random" and self.bank:
            raise ConfigError(f"option mask={self.mask!r} draws each matrix's factors from its "
                              f"own delta: a shared bank (bank={self.bank}) cannot; leave bank "
                              "unset")
        if self.attention_mixing not in ("rotate", "permute"):
            raise ConfigError("option 'attention_mixing' must be 'rotate' or 'permute', got "
                              f"{self.attention_mixing!r}")

    @property
    def bank_size(self) -> int:
        if self.bank is not None:
            return self.bank
        return 4 if self.mask == "random" else 0


def masked_matrices(cfg: ModelConfig) -> list[str]:
    """Every weight matrix the device holds masked (base names, without .weight)."""
    names = ["embed"] + (["pos_embed"] if cfg.position == "learned" else [])
    names += [] if cfg.tie_embeddings else ["lm_head"]
    mlp = ("gate", "up", "down") if cfg.mlp == "gated" else ("up", "down")
    for i in range(cfg.n_layers):
        names += [f"layers.{i}.attn.{x}" for x in "qkvo"] + [f"layers.{i}.mlp.{x}" for x in mlp]
    return names


@dataclass
class FactorBank:
    """Secret mask factors. With multiplexing, B/A of each matrix are combinations of the bank."""

    rank: int
    bank_b: dict[int, torch.Tensor] = field(default_factory=dict)   # in-dim → (m, in, r)
    bank_a: dict[int, torch.Tensor] = field(default_factory=dict)   # out-dim → (m, r, out)
    coef: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    direct: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B, A, γ) of a matrix."""
        if name in self.direct:
            return self.direct[name]
        alpha, beta, gamma = self.coef[name]
        b_dim, a_dim = int(alpha[0]), int(beta[0])
        B = torch.einsum("m,mir->ir", alpha[1:], self.bank_b[b_dim])
        A = torch.einsum("m,mro->ro", beta[1:], self.bank_a[a_dim])
        return B, A, gamma

    def wipe(self) -> None:
        for t in [*self.bank_b.values(), *self.bank_a.values(),
                  *(x for a, b, _ in self.coef.values() for x in (a, b)),
                  *(x for b, a, _ in self.direct.values() for x in (b, a))]:
            t.zero_()

    def nbytes(self) -> int:
        banks = sum(t.nbytes for t in [*self.bank_b.values(), *self.bank_a.values()])
        coefs = sum(a.nbytes + b.nbytes + 8 for a, b, _ in self.coef.values())
        direct = sum(b.nbytes + a.nbytes + 8 for b, a, _ in self.direct.values())
        return banks + coefs + direct


def _shape(weights: Weights, name: str) -> tuple[int, int]:
    out_dim, in_dim = weights[f"{name}.weight"].shape
    return in_dim, out_dim


def delta_subspaces(weights: Weights, prior: Weights, name: str, rank: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`rank` left (out × k) and right (in × k) singular vectors of W − W_prior and the
    singular values (k): where the fine-tune put its largest changes. Fewer than `rank`
    directions when the matrix is that thin; arbitrary ones where the delta is exactly zero
    (nothing to hide there)."""
    key = f"{name}.weight"
    if key not in prior or prior[key].shape != weights[key].shape:
        raise ConfigError(f"mask='delta': the prior has no {key} of shape "
                          f"{tuple(weights[key].shape)}; is it the checkpoint this model was "
                          "fine-tuned from?")
    d = weights[key].double() - prior[key].double()
    u, sv, vh = torch.linalg.svd(d, full_matrices=False)
    k = min(rank, u.shape[1])
    return u[:, :k], vh[:k].t(), sv[:k]


def make_factors(cfg: ModelConfig, weights: Weights, lcfg: LoroConfig,
                 rng: SecretRng, prior: Weights | None = None) -> FactorBank:
    """Step 1's secrets: Gaussian factors (a bank and each matrix's coefficients, or independent
    B, A per matrix when the bank is 0) and each matrix's γ, all drawn from `rng`. Delta masks
    (`prior` given): B = V_k·G₁, A = G₂·U_kᵀ with G₁, G₂ Gaussian (k × r, r × k), U_k, V_k the
    delta's top singular vectors — the mask's energy lies exactly where the fine-tune's largest
    changes do, so removing W' − W_prior's top-r directions (the peel) removes those too."""
    r = lcfg.rank
    bank = FactorBank(rank=r)
    names = masked_matrices(cfg)
    if lcfg.mask != "random":
        if prior is None:
            raise ConfigError(f"mask={lcfg.mask!r} needs the prior's weights")
        for n in names:
            u, v, sv = delta_subspaces(weights, prior, n, r)
            if lcfg.mask == "offload":
                # γ(BA)ᵀ = −U_r·S_r·V_rᵀ exactly (γ = 1, no rescaling below)
                bank.direct[n] = (v.float(), (-(sv[:, None] * u.t())).float(), 1.0)
                continue
            bank.direct[n] = ((v @ rng.randn(v.shape[1], r, dtype=torch.float64)).float(),
                              (rng.randn(r, u.shape[1], dtype=torch.float64) @ u.t()).float(), 1.0)
        if lcfg.mask == "offload":
            return bank
    elif lcfg.bank_size == 0:
        for n in names:
            i, o = _shape(weights, n)
            bank.direct[n] = (rng.randn(i, r), rng.randn(r, o), 1.0)
    else:
        uses_in: dict[int, int] = {}
        uses_out: dict[int, int] = {}
        for n in names:
            i, o = _shape(weights, n)
            uses_in[i] = uses_in.get(i, 0) + 1
            uses_out[o] = uses_out.get(o, 0) + 1
        # a bank never larger than the number of matrices that draw from it
        for dim, uses in uses_in.items():
            bank.bank_b[dim] = rng.randn(min(lcfg.bank_size, uses), dim, r)
        for dim, uses in uses_out.items():
            bank.bank_a[dim] = rng.randn(min(lcfg.bank_size, uses), r, dim)
        for n in names:
            i, o = _shape(weights, n)
            alpha = torch.cat([torch.tensor([float(i)]), rng.randn(len(bank.bank_b[i]))])
            beta = torch.cat([torch.tensor([float(o)]), rng.randn(len(bank.bank_a[o]))])
            bank.coef[n] = (alpha, beta, 1.0)
    # γ so that the mask dominates the weight: ‖γ(BA)ᵀ‖ = mask_ratio·‖W‖, with the sign that makes
    # ⟨W, γ(BA)ᵀ⟩ ≤ 0: then |cos(W', W)| ≤ 1/√(1+mask_ratio²) however a small matrix's random
    # mask happens to align with it (a positive alignment measured up to 0.205 on tiny models)
    for n in names:
        B, A, _ = bank.factors(n)
        w = weights[f"{n}.weight"].double()
        mask = (B @ A).t()
        gamma = lcfg.mask_ratio * float(w.norm()) / float(mask.norm())
        if float((w * mask).sum()) > 0:
            gamma = -gamma
        if n in bank.direct:
            bank.direct[n] = (B, A, gamma)
        else:
            alpha, beta, _ = bank.coef[n]
            bank.coef[n] = (alpha, beta, gamma)
    return bank


def masked_weights(cfg: ModelConfig, weights: Weights, bank: FactorBank) -> dict[str, torch.Tensor]:
    """What the device holds: W' = W + γ(BA)ᵀ for every masked matrix, nothing else."""
    device = {}
    for n in masked_matrices(cfg):
        B, A, gamma = bank.factors(n)
        device[f"{n}.weight"] = (weights[f"{n}.weight"].double() + gamma * (B @ A).t()).float()
    return device


def input_groups(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Linears that share one input (one pad, one round trip), keyed by the first name."""
    groups: dict[str, tuple[str, ...]] = {}
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        # constant attention (MERGE) has no q/k projections: v alone reads the norm's output
        attn_in = ((f"{p}.attn.v",) if cfg.attention == "constant"
                   else (f"{p}.attn.q", f"{p}.attn.k", f"{p}.attn.v"))
        for g in (attn_in, (f"{p}.attn.o",),
                  ((f"{p}.mlp.gate", f"{p}.mlp.up") if cfg.mlp == "gated" else (f"{p}.mlp.up",)),
                  (f"{p}.mlp.down",)):
            groups[g[0]] = g
    head = "embed" if cfg.tie_embeddings else "lm_head"
    groups[head] = (head,)
    return groups


class LoroProtocol:
    """The enclave's side of LoRO's linear protocol (see the module docstring, step 2).

    The correction γ(xB)A is computed straight from the bank, never expanding a matrix's B and A:
    x·bank_b is shared by every matrix of a group (one (m, N, r) product), each matrix mixes it
    with its α, then one (N, m·r) × (m·r, out) product against the stacked bank_a applies β and A
    together."""

    def __init__(self, cfg: ModelConfig, bank: FactorBank, biases: dict[str, torch.Tensor],
                 pool: PadPool, pad_ratio: float) -> None:
        self.cfg, self.bank, self.biases, self.pool = cfg, bank, biases, pool
        self.pad_ratio = pad_ratio
        self.group_of = {n: g for g, names in pool.groups.items() for n in names}
        self.enclave_flops = 0
        self.overlap_flops = 0      # the part done while the device multiplies (precompute)
        # bank_b flattened to (in, m·r): x·bank_b for a whole group in one product (a copy; counted
        # in nbytes); bank_a viewed as (m·r, out). The correction γ(xB)A is ~mask_ratio·|y|, so
        # float32 adds ~mask_ratio·ε·|y| of error, small beside the device's ~(1+mask_ratio)(1+
        # pad_ratio)·ε·|y|; the pad term, ~pad_ratio·(1+mask_ratio)·|y|, stays float64.
        self.b_flat = {d: b.permute(1, 0, 2).reshape(d, -1) for d, b in bank.bank_b.items()}
        self.a_flat = {d: a.reshape(-1, d) for d, a in bank.bank_a.items()}
        self.bias64 = {k.removesuffix(".bias"): v.double() for k, v in biases.items()}

    def nbytes(self) -> int:
        """Enclave memory this protocol adds to the bank's (flattened copies, float64 biases)."""
        return sum(t.nbytes for t in [*self.b_flat.values(), *self.bias64.values()])

    def prepare(self, rows: int) -> None:
        if self.pool.mode == "fresh":
            # offline work, before the device has anything to do: every core of this process
            with enclave_threads(len(available_cpus())):
                self.pool.refill(rows)

    def pad_cost(self) -> PadCost:
        return self.pool.cost

    def wipe(self) -> None:
        """Zero the factor bank (and its flattened copies) and drop the pads' keys."""
        self.bank.wipe()
        for t in [*self.b_flat.values(), *self.a_flat.values()]:
            t.zero_()
        self.pool.wipe()

    def conceal(self, group: str, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        # the critical path (the device waits for it): as few ops as the pad takes
        g, ticket = self.pool.take(self.group_of[group], x.shape[0])
        # pad scale: pad_ratio × the row's RMS, rounded up to a power of two (frexp: v = m·2^e
        # with m in [0.5, 1), so 2^e ≥ v > 2^(e−1))
        if x.shape[0] == 1:       # decode: one row — Python floats, ~10× cheaper than tensors
            v = float(torch.linalg.vector_norm(x)) * (self.pad_ratio / x.shape[1] ** 0.5) + 1e-30
            scale: float | torch.Tensor = math.ldexp(1.0, math.frexp(v)[1])
            x_dev = torch.add(x, g, alpha=scale)
        else:
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)          # (N, 1)
            v = norm * (self.pad_ratio / x.shape[1] ** 0.5) + 1e-30
            scale = torch.ldexp(torch.ones_like(norm), torch.frexp(v)[1])
            x_dev = torch.addcmul(x, scale, g)
            scale = scale.double()
        return x_dev, _Pending(scale, ticket, x)

    def request_args(self, ctx: Any) -> dict:
        """Extra arguments of the linear request: the sealed pad products, sent ahead of ỹ."""
        return self.pool.fetch_args(ctx.ticket)

    def precompute(self, name: str, x: torch.Tensor, ctx: Any, fetched: torch.Tensor | None
                   ) -> torch.Tensor:
        """Everything the enclave subtracts from ỹ, made while the device multiplies:
        γ(xB)A − b + s·(g·W'ᵀ), float64 (the pad products opened from `fetched`)."""
        pad = self.pool.products(name, ctx.ticket, fetched)                   # g·W'ᵀ
        corr = self._correction(name, ctx)
        if isinstance(ctx.scale, float):
            return corr.add_(pad, alpha=ctx.scale)
        return corr.add_(pad.double() * ctx.scale)

    def _xb(self, ctx: "_Pending") -> torch.Tensor | None:
        """Few rows (decode): the rows mixed through the whole bank, once per group (N, m_b, r);
        None when expanding each matrix's factors is cheaper (prefill)."""
        x = ctx.x
        if ctx.xb is None and self.b_flat and x.shape[0] <= len(self.bank.bank_b[x.shape[1]]):
            bank_b = self.b_flat[x.shape[1]]
            ctx.xb = (x @ bank_b).view(x.shape[0], -1, self.bank.rank)
            self._count(2 * x.shape[0] * bank_b.numel())
        return ctx.xb

    def _correction(self, name: str, ctx: "_Pending") -> torch.Tensor:
        """γ(xB)A − b, float64."""
        x = ctx.x
        N, r = x.shape[0], self.bank.rank
        bias = self.bias64.get(name)
        base = -bias if bias is not None else torch.zeros((), dtype=torch.float64)
        if name in self.bank.direct:
            B, A, gamma = self.bank.direct[name]
            self._count(2 * N * r * (B.shape[0] + A.shape[1]))
            return torch.add(base, (x @ B) @ A, alpha=gamma)
        alpha, beta, gamma = self.bank.coef[name]
        out_dim = int(beta[0])
        xb = self._xb(ctx)
        if xb is None:
            # many rows (prefill): expanding this matrix's B and A costs m·r·(in+out) once, less
            # than mixing every row through the bank (N·m·r·(in+out))
            B = torch.tensordot(alpha[1:], self.bank.bank_b[int(alpha[0])], 1)      # (in, r)
            A = torch.tensordot(beta[1:], self.bank.bank_a[out_dim], 1)             # (r, out)
            self._count(2 * r * (B.shape[0] * (len(alpha) - 1) + out_dim * (len(beta) - 1))
                        + 2 * N * r * (B.shape[0] + out_dim))
            return torch.add(base, (x @ B) @ A, alpha=gamma)
        xB = torch.matmul(alpha[1:], xb)                                      # (N, r)
        # Σ_j β_j (xB)·bank_a[j] as one product: (N, m_a·r) × (m_a·r, out)
        z = (beta[1:, None] * xB[:, None, :]).reshape(N, -1)
        self._count(2 * N * r * (len(beta) - 1) * (out_dim + 1))
        return torch.add(base, z @ self.a_flat[out_dim], alpha=gamma)        # (N, out), float64

    def _count(self, flops: int) -> None:
        self.enclave_flops += flops
        self.overlap_flops += flops

    def reveal(self, name: str, y_dev: torch.Tensor, pre: torch.Tensor, ctx: Any) -> torch.Tensor:
        # the one step after the device answers: ỹ − (γ(xB)A − b + s·g·W'ᵀ), in float64
        return torch.sub(y_dev, pre).float()

    def table_rows(self, name: str, ids: torch.Tensor, rows_dev: torch.Tensor) -> torch.Tensor:
        B, A, gamma = self.bank.factors(name)
        return (rows_dev.double() - gamma * (A[:, ids].t() @ B.t()).double()).float()  # (N, d)


@dataclass
class _Pending:
    """One linear request's private context: the pad scale (a float for one row), the pad
    ticket, the true input, and x·bank_b once a member of the group has made it."""

    scale: float | torch.Tensor
    ticket: tuple[int, int]
    x: torch.Tensor
    xb: torch.Tensor | None = None


@dataclass
class LoroSecrets:
    """Everything the enclave keeps secret: what `veil protect` seals into enclave.sealed (the
    public settings, `LoroConfig`, are recorded beside them)."""

    bank: FactorBank
    local: dict[str, torch.Tensor]          # norm weights and biases
    perms: list[HeadMixing]

    def wipe(self, weights: bool = False) -> None:
        """Zero the drawn secrets; with `weights`, the enclave's parameters too (when they are
        its own copy, unsealed from an artifact)."""
        self.bank.wipe()
        for p in self.perms:
            p.wipe()
        for t in self.local.values() if weights else ():
            t.zero_()

    def to_sealable(self) -> tuple[dict[str, torch.Tensor], dict]:
        t: dict[str, torch.Tensor] = {f"local.{k}": v for k, v in self.local.items()}
        t.update({f"bank.b.{d}": v for d, v in self.bank.bank_b.items()})
        t.update({f"bank.a.{d}": v for d, v in self.bank.bank_a.items()})
        gammas = {}
        for n, (alpha, beta, g) in self.bank.coef.items():
            t[f"coef.alpha.{n}"], t[f"coef.beta.{n}"], gammas[n] = alpha, beta, g
        for n, (B, A, g) in self.bank.direct.items():
            t[f"direct.B.{n}"], t[f"direct.A.{n}"], gammas[n] = B, A, g
        t.update(seal_mixings(self.perms))
        return t, {"rank": self.bank.rank, "gammas": gammas, "layers": len(self.perms)}

    @staticmethod
    def from_sealed(t: dict[str, torch.Tensor], meta: dict) -> "LoroSecrets":
        bank = FactorBank(rank=int(meta["rank"]))
        gammas = meta["gammas"]
        for k, v in t.items():
            kind, _, rest = k.partition(".")
            if kind == "bank":
                side, _, dim = rest.partition(".")
                (bank.bank_b if side == "b" else bank.bank_a)[int(dim)] = v
            elif kind == "coef" and rest.startswith("alpha."):
                n = rest.removeprefix("alpha.")
                bank.coef[n] = (v, t[f"coef.beta.{n}"], float(gammas[n]))
            elif kind == "direct" and rest.startswith("B."):
                n = rest.removeprefix("B.")
                bank.direct[n] = (v, t[f"direct.A.{n}"], float(gammas[n]))
        local = {k.removeprefix("local."): v for k, v in t.items() if k.startswith("local.")}
        return LoroSecrets(bank, local, unseal_mixings(t, int(meta["layers"])))
