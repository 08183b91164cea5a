"""KV-cache inversion: the conversation read back from a KV cache and the public model.

Threat: a memory scraper on the untrusted accelerator (LeftoverLocals-style) reads the KV cache;
it knows the model (an open checkpoint). Layer 0's values depend on the token alone (and, for
learned positions, on its position): v₀ = W_v · norm₀(E[t] (+ P[p])) + b_v. So the attacker
tabulates v₀ for every vocabulary token once and reads each cached row off by nearest neighbour —
no queries, no training. This is attack 1 of issue #15 ("plain cache, public weights"); it reads
caches kept in the clear, and it is the baseline the transformed caches (KV-Shield's
permutations, LoRO's and TLG's head mixings) must be measured against with stronger attacks
(permutation recovery, rotation-invariant signatures, Procrustes), which are not built yet.

Inputs: the layer-0 value cache (B, n_kv_heads, S, head_dim), as a device view holds it
(`kv_cache.v`[0]), the public config and weights, and the cache slots' positions (public: a
request's length is visible to the device).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

import veil
from veil import schemes
from veil.backends.plain import TorchOps
from veil.errors import UnsupportedError
from veil.model.config import ModelConfig
from veil.model.forward import forward
from veil.model.ops import Step
from veil.model.weights import Weights

_CHUNK = 4096        # vocabulary rows per product: bounds memory on a 49 152-token vocabulary


def vocabulary_values(cfg: ModelConfig, weights: Weights, position: int | None = None
                      ) -> torch.Tensor:
    """Layer 0's value rows (V, n_kv_heads·head_dim) for every token of the vocabulary — at
    `position` for a model with learned positions (None otherwise: they do not depend on it)."""
    ops = TorchOps(cfg, weights)
    table = weights["embed.weight"]
    rows = []
    with torch.inference_mode():
        for start in range(0, table.shape[0], _CHUNK):
            x = table[start:start + _CHUNK][None].float()                        # (1, n, d)
            if cfg.position == "learned":
                assert position is not None, "learned positions: give the row's position"
                x = x + weights["pos_embed.weight"][position]
            h = x if cfg.merged else ops.norm(x, "layers.0.attn_norm")
            rows.append(ops.linear(h, "layers.0.attn.v")[0])                      # (n, kv_dim)
    return torch.cat(rows)


def invert_values(cfg: ModelConfig, weights: Weights, cache_v0: torch.Tensor,
                  positions: list[int]) -> list[int]:
    """Token id of each slot of one sequence, read off layer 0's value cache by nearest
    neighbour (L2) among the vocabulary's value rows.

    cache_v0: (n_kv_heads, S, head_dim), one row of the batch; positions: each slot's position
    (slots 0 … len(positions) − 1 are read)."""
    n = len(positions)
    got = cache_v0[:, :n].transpose(0, 1).reshape(n, -1).float()                  # (n, kv_dim)
    if cfg.position != "learned":
        table = vocabulary_values(cfg, weights)
        return torch.cdist(got, table).argmin(-1).tolist()
    out = []
    for i, p in enumerate(positions):       # each position has its own table
        out.append(int(torch.cdist(got[i:i + 1], vocabulary_values(cfg, weights, p)).argmin()))
    return out


def _signature(rows: torch.Tensor, n_heads: int, kind: str) -> torch.Tensor:
    """Per-head signatures (N, n_heads, k) of value rows (N, n_heads·head_dim) that a head-block
    transform leaves unchanged: `sorted` — each head's entries sorted (invariant under a
    permutation of its features); `norms` — each head's L2 norm (invariant under any orthogonal
    transform of it, rotations included)."""
    blocks = rows.view(rows.shape[0], n_heads, -1)
    if kind == "sorted":
        return blocks.sort(dim=-1).values
    if kind == "norms":
        return blocks.norm(dim=-1, keepdim=True)
    raise ValueError(f"unknown signature {kind!r}")


def invert_mixed_values(cfg: ModelConfig, weights: Weights, cache_v0: torch.Tensor,
                        positions: list[int], kind: str) -> list[int]:
    """Attack 2 of issue #15, the signature half: read a layer-0 value cache kept under secret
    head-block transforms (KV heads permuted, each head's features permuted — `sorted` — or
    rotated — `norms`) by matching transform-invariant per-head signatures against the
    vocabulary's, under the best assignment of the device's head slots to true heads (the
    permutation of heads is one per layer: every slot's row shares it, so it is chosen once for
    the whole sequence by total distance)."""
    import itertools

    n = len(positions)
    nkv = cfg.n_kv_heads
    got = _signature(cache_v0[:, :n].transpose(0, 1).reshape(n, -1).float(), nkv, kind)
    if cfg.position != "learned":
        shared = _signature(vocabulary_values(cfg, weights), nkv, kind)          # (V, nkv, k)
        sigs = [shared] * n
    else:
        sigs = [_signature(vocabulary_values(cfg, weights, p), nkv, kind) for p in positions]
    best: tuple[float, list[int]] | None = None
    for order in itertools.permutations(range(nkv)):
        total, picks = 0.0, []
        for i in range(n):
            d = (sigs[i][:, list(order)] - got[i]).flatten(1).norm(dim=-1)        # (V,)
            j = int(d.argmin())
            total += float(d[j])
            picks.append(j)
        if best is None or total < best[0]:
            best = (total, picks)
    assert best is not None
    return best[1]


def recovery_rate(predicted: list[int], truth: list[int]) -> float:
    """The share of positions whose token was recovered exactly."""
    assert len(predicted) == len(truth) and truth
    return sum(int(a == b) for a, b in zip(predicted, truth)) / len(truth)


@dataclass(frozen=True)
class InversionResult:
    """One attack on one cache: the share of slots read back exactly, and what was read."""

    attack: str
    recovered: float
    tokens: list[int]


def layer0_values(model: str, scheme: str, ids: list[int], max_new_tokens: int,
                  **options: Any) -> tuple[torch.Tensor, list[int]]:
    """Generate under `scheme` and return layer 0's value cache as the untrusted side holds it
    (n_kv_heads, S, head_dim) and the true tokens in its slots. Under `plain` the untrusted side
    is the host, and its cache is the plain one."""
    if scheme == "plain":
        with veil.load(model) as m:
            tokens = ids + m.generate(ids, max_new_tokens=max_new_tokens,
                                      ignore_eos=True).token_ids[:-1]
            cache = m.ops.new_cache(1, len(tokens))
            with torch.inference_mode():
                forward(m.cfg, m.ops, torch.tensor([tokens]),
                        Step(torch.arange(len(tokens))[None], None, 0), cache)
            return cache.v[0, 0], tokens
    if "record_view" not in {f.name for f in fields(schemes.get(scheme).options)}:
        raise UnsupportedError(f"scheme {scheme!r} has no untrusted device holding a KV cache")
    with veil.load(model, scheme=scheme, record_view=True, **options) as m:
        r = m.generate(ids, max_new_tokens=max_new_tokens, ignore_eos=True)
        resident = m.device_view().resident
        if "kv_cache.v" not in resident:
            raise UnsupportedError(f"under {scheme!r} the KV cache stays in the enclave")
        return resident["kv_cache.v"][0, 0], ids + r.token_ids[:-1]


def attack_cache(cfg: ModelConfig, weights: Weights, cache_v0: torch.Tensor,
                 tokens: list[int]) -> list[InversionResult]:
    """Every attack on one cache (positions: slot i holds position i, an unpadded request)."""
    positions = list(range(len(tokens)))
    out = [InversionResult("nearest", 0.0, invert_values(cfg, weights, cache_v0, positions))]
    out += [InversionResult(kind, 0.0, invert_mixed_values(cfg, weights, cache_v0, positions, kind))
            for kind in ("sorted", "norms")]
    return [InversionResult(r.attack, recovery_rate(r.tokens, tokens), r.tokens) for r in out]
