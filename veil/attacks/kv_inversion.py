"""KV-cache inversion: the conversation read back from what the untrusted device holds or received,
with the public model only.

Threat (issue #15): a memory scraper on the accelerator (LeftoverLocals-style) knows the model (an
open checkpoint). Layer 0's values depend on the token alone (and, for learned positions, on its
position): v₀ = W_v · norm₀(E[t] (+ P[p])) + b_v, so the attacker tabulates v₀ for the whole
vocabulary once and matches the cached rows against it. Two adversary views:
  snapshot  what the device's memory holds at one moment: resident weights and the KV cache
  device    that, plus everything the device received (`record_view=True`)
The attacks, weakest first (each returns one token per cache slot):
  nearest   plain cache: nearest neighbour of each value row among the vocabulary's (attack 1);
            `nearest-keys` the same on the keys, RoPE undone at each slot's public position
  sorted    head-block permutations: each head's entries sorted are unchanged (attack 2)
  norms     head-block rotations: each head's squared norm is unchanged; with padding, the pad's
            expected energy (estimated from the cache itself) is taken off first (attack 2)
  gram      known plaintext (attack 5): the first `known` tokens are known (a chat template's fixed
            prefix stands for them); a cached row's inner products with the known rows equal the
            true rows' under any orthogonal transform, so [‖c‖², c·c_a] is matched against
            [‖v‖², v·v_a] for every vocabulary token
  procrustes  from any attack's guesses, fit each slot's transform as the orthogonal (padded:
            semi-orthogonal) map from the guessed true rows to the cached ones, invert the cache
            with it and read it off by nearest neighbour; three rounds (attack 2's last step)
  folded    fold=true (attack 3): the device's W_v' = M·W_v per head block, so M = W_v'·W_v⁺
            against the public weights, and the cache is undone exactly
  inputs    device view: layer 0's linear inputs are the tokens' normed embeddings (kvshield sends
            the embedding rows themselves) — nearest neighbour (permuted inputs, as TLG and
            ShadowNet send: sorted entries)
Every attack on a slot assignment (which device head slot holds which true KV head) tries them all
(≤ 5 KV heads; more: a linear assignment on the summed costs).
Attack 4 (a private fine-tuned model, the public prior standing in) needs a fine-tuned victim;
issue #16 builds one, and the same functions run with the prior's weights.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from scipy.optimize import linear_sum_assignment

import veil
from veil import schemes
from veil.backends.plain import TorchOps, rope_tables
from veil.errors import UnsupportedError
from veil.model.config import ModelConfig
from veil.model.forward import forward
from veil.model.ops import Step
from veil.model.weights import Weights
from veil.tee.device import View

_CHUNK = 4096        # vocabulary rows per product: bounds memory on a 49 152-token vocabulary
SNAPSHOT, DEVICE = "snapshot", "device"


class Vocabulary:
    """The attacker's tables from the public model: layer 0's value rows and input rows for every
    token (per position for learned positions), computed once and kept."""

    def __init__(self, cfg: ModelConfig, weights: Weights) -> None:
        self.cfg, self.weights = cfg, weights
        self.ops = TorchOps(cfg, weights)
        self._cache: dict[tuple, torch.Tensor] = {}

    def _layer0(self, position: int | None, what: str) -> torch.Tensor:
        table = self.weights["embed.weight"]
        rows = []
        with torch.inference_mode():
            for start in range(0, table.shape[0], _CHUNK):
                x = table[start:start + _CHUNK][None].float()                    # (1, n, d)
                if self.cfg.position == "learned":
                    assert position is not None, "learned positions: give the row's position"
                    x = x + self.weights["pos_embed.weight"][position]
                h = x if self.cfg.merged else self.ops.norm(x, "layers.0.attn_norm")
                proj = {"values": "layers.0.attn.v", "keys": "layers.0.attn.k"}.get(what)
                rows.append(h[0] if proj is None else self.ops.linear(h, proj)[0])
        return torch.cat(rows)

    def _key(self, position: int | None) -> int | None:
        return position if self.cfg.position == "learned" else None

    def _memo(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def values(self, position: int | None = None) -> torch.Tensor:
        """(V, n_kv_heads·head_dim) layer-0 value rows."""
        p = self._key(position)
        return self._memo(("values", p), lambda: self._layer0(p, "values"))

    def keys(self, position: int | None = None) -> torch.Tensor:
        """(V, n_kv_heads·head_dim) layer-0 key rows before RoPE."""
        p = self._key(position)
        return self._memo(("keys", p), lambda: self._layer0(p, "keys"))

    def inputs(self, position: int | None = None) -> torch.Tensor:
        """(V, d) layer 0's input to its q/k/v projections."""
        p = self._key(position)
        return self._memo(("inputs", p), lambda: self._layer0(p, "inputs"))

    def sorted_inputs(self, position: int | None = None) -> torch.Tensor:
        """inputs() with each row's entries sorted (against inputs whose features were permuted)."""
        return self._memo(("sorted inputs", self._key(position)),
                          lambda: self.inputs(position).sort(dim=-1).values)

    def sorted_heads(self) -> torch.Tensor:
        """heads() with each head's entries sorted (position-free models)."""
        return self._memo(("sorted heads",), lambda: self.heads().sort(dim=-1).values)

    def heads(self, position: int | None = None) -> torch.Tensor:
        """(V, n_kv_heads, head_dim)."""
        return self.values(position).view(-1, self.cfg.n_kv_heads, self.cfg.head_dim)


def _per_position(vocab: Vocabulary, positions: list[int]) -> list[torch.Tensor]:
    """Each slot's vocabulary heads (V, nkv, hd): one shared table unless positions are learned."""
    if vocab.cfg.position != "learned":
        return [vocab.heads()] * len(positions)
    return [vocab.heads(p) for p in positions]


def _best_assignment(dist: torch.Tensor) -> list[int]:
    return _assign(dist)[1]


def _assign(dist: torch.Tensor) -> tuple[float, list[int]]:
    """dist (slots, heads, T, V): squared distances of each slot's row t to vocabulary token u
    as true head g. The slot → head assignment (one per layer, shared by every row) minimising
    the total of each row's best match; returns each row's token under it."""
    nkv = dist.shape[0]
    if nkv <= 5:
        orders = list(itertools.permutations(range(nkv)))
    else:
        cost = dist.min(dim=-1).values.sum(dim=-1)                               # (slots, heads)
        orders = [tuple(linear_sum_assignment(cost.numpy())[1].tolist())]
    best: tuple[float, list[int]] | None = None
    for order in orders:
        total = sum(dist[j, g] for j, g in enumerate(order))                    # (T, V)
        m = total.min(dim=-1)
        score = float(m.values.sum())
        if best is None or score < best[0]:
            best = (score, m.indices.tolist())
    assert best is not None
    return best


def _cache_rows(cfg: ModelConfig, cache_v0: torch.Tensor, n: int) -> torch.Tensor:
    """(nkv, S, D) cache → (n, nkv, D) rows of the first n slots."""
    return cache_v0[:, :n].transpose(0, 1).float()


def invert_values(vocab: Vocabulary, cache_v0: torch.Tensor, positions: list[int]) -> list[int]:
    """Attack 1: each slot's row is the nearest vocabulary row (L2)."""
    n = len(positions)
    got = _cache_rows(vocab.cfg, cache_v0, n).reshape(n, -1)
    if got.shape[1] != vocab.cfg.n_kv_heads * vocab.cfg.head_dim:
        return [-1] * n                   # padded rows: a plain table cannot even be compared
    if vocab.cfg.position != "learned":
        return _sq_dist(got, vocab.values()).argmin(-1).tolist()
    return [int(_sq_dist(got[i:i + 1], vocab.values(p)).argmin()) for i, p in enumerate(positions)]


def invert_keys(vocab: Vocabulary, cache_k0: torch.Tensor, positions: list[int]) -> list[int]:
    """Attack 1 on the keys: undo RoPE at each slot's (public) position — RoPE is a rotation by
    known angles — and read each row off by nearest neighbour among the vocabulary's keys."""
    cfg = vocab.cfg
    n = len(positions)
    got = _cache_rows(cfg, cache_k0, n)                                     # (n, nkv, hd)
    if got.shape[-1] != cfg.head_dim:
        return [-1] * n
    if cfg.position == "rope":
        cos, sin = rope_tables(cfg)
        p = torch.tensor(positions)
        c, s_ = cos[p][:, None], sin[p][:, None]                            # (n, 1, hd)
        half = cfg.head_dim // 2
        rot = torch.cat([-got[..., half:], got[..., :half]], dim=-1)
        got = got * c - rot * s_                                            # R(−θ)
    got = got.reshape(n, -1)
    if cfg.position != "learned":
        return _sq_dist(got, vocab.keys()).argmin(-1).tolist()
    return [int(_sq_dist(got[i:i + 1], vocab.keys(p)).argmin()) for i, p in enumerate(positions)]


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(T, k) × (V, k) → (T, V) squared distances."""
    return torch.cdist(a.double(), b.double()).pow(2).float()


def _nearest_dist(rows: torch.Tensor, tables: list[torch.Tensor], g: int) -> torch.Tensor:
    """(n, hd) true-head-g rows → (n, V) squared distances to the vocabulary's head-g rows (one
    product when the table does not depend on the position)."""
    if all(t is tables[0] for t in tables):
        return torch.cdist(rows.float(), tables[0][:, g]).pow(2)
    return torch.cat([torch.cdist(rows[i:i + 1].float(), t[:, g]).pow(2) for i, t in enumerate(tables)])


def invert_sorted(vocab: Vocabulary, cache_v0: torch.Tensor, positions: list[int]) -> list[int]:
    """Attack 2 against permutations: per head, the sorted entries of the cached row against the
    sorted entries of every vocabulary row, under the best slot assignment."""
    n = len(positions)
    rows = _cache_rows(vocab.cfg, cache_v0, n)                                  # (n, nkv, D)
    if rows.shape[-1] != vocab.cfg.head_dim:
        return [-1] * n
    got = rows.sort(dim=-1).values
    tables = _per_position(vocab, positions)
    nkv = vocab.cfg.n_kv_heads
    if vocab.cfg.position != "learned":
        voc = vocab.sorted_heads()
        dist = torch.stack([torch.stack([_sq_dist(got[:, j], voc[:, g]) for g in range(nkv)])
                            for j in range(nkv)])
    else:
        dist = torch.stack([torch.stack([torch.cat([
            _sq_dist(got[i:i + 1, j], tables[i][:, g].sort(dim=-1).values) for i in range(n)])
            for g in range(nkv)]) for j in range(nkv)])
    return _best_assignment(dist)


def invert_gram(vocab: Vocabulary, cache_v0: torch.Tensor, positions: list[int],
                known: dict[int, int] | None = None) -> list[int]:
    """Attacks 2 (`norms`, no known tokens) and 5 (`gram`): per head, [‖c‖², c·c_a for each
    known slot a] against [‖v‖² + e, v·v_a] for every vocabulary token v, where v_a is the known
    token's true row and e the padding's energy (0 unless the cache rows are longer than the
    head: then estimated from the known rows, or from the cache's mean against the vocabulary's).
    Known slots are returned as their known tokens."""
    known = known or {}
    got = _gram(vocab, _cache_rows(vocab.cfg, cache_v0, len(positions)).double(), positions,
                known)[1]
    return [known.get(i, t) for i, t in enumerate(got)]


def _gram(vocab: Vocabulary, rows: torch.Tensor, positions: list[int], known: dict[int, int]
          ) -> tuple[float, list[int]]:
    """invert_gram on rows (n, nkv, D): (the assignment's total distance, tokens)."""
    cfg = vocab.cfg
    n = len(positions)
    padded = rows.shape[-1] != cfg.head_dim
    tables = _per_position(vocab, positions)
    nkv = cfg.n_kv_heads
    anchors = sorted(known)
    dist = torch.zeros(nkv, nkv, n, tables[0].shape[0])
    for j in range(nkv):
        c = rows[:, j]                                                          # (n, D)
        sig_c = torch.cat([c.pow(2).sum(-1, keepdim=True), c @ c[anchors].T], dim=1)  # (n, 1+A)
        for g in range(nkv):
            true_a = (torch.stack([tables[a][known[a], g].double() for a in anchors])
                      if anchors else torch.zeros(0, cfg.head_dim, dtype=torch.float64))
            energy = 0.0
            if padded:
                energy = (float((sig_c[anchors, 0] - true_a.pow(2).sum(-1)).mean()) if anchors
                          else float(sig_c[:, 0].mean() - tables[0][:, g].double().pow(2).sum(-1).mean()))

            def sig(voc: torch.Tensor) -> torch.Tensor:
                voc = voc.double()
                return torch.cat([voc.pow(2).sum(-1, keepdim=True) + energy, voc @ true_a.T], dim=1)

            if cfg.position != "learned":
                dist[j, g] = _sq_dist(sig_c, sig(tables[0][:, g]))
            else:
                for i in range(n):
                    dist[j, g, i] = _sq_dist(sig_c[i:i + 1], sig(tables[i][:, g]))[0]
    return _assign(dist)


def invert_pca(vocab: Vocabulary, cache_v0: torch.Tensor, positions: list[int],
               known: dict[int, int] | None = None) -> list[int]:
    """Against padding: the true rows and the pads lie in orthogonal subspaces of each slot's
    rows, with different spectra. Keep each slot's top (or bottom) head_dim principal directions
    of its cached rows — whichever then fits the vocabulary better — and run `gram` on them.
    Needs more cached rows than dimensions to separate anything (a long conversation)."""
    known = known or {}
    cfg = vocab.cfg
    n = len(positions)
    rows = _cache_rows(cfg, cache_v0, n).double()                               # (n, nkv, D)
    hd = cfg.head_dim
    if rows.shape[-1] == hd:
        return invert_gram(vocab, cache_v0, positions, known)
    best: tuple[float, list[int]] | None = None
    for keep in ("top", "bottom"):
        proj = []
        for j in range(rows.shape[1]):
            _, vecs = torch.linalg.eigh(rows[:, j].T @ rows[:, j])               # ascending
            basis = vecs[:, -hd:] if keep == "top" else vecs[:, :hd]
            proj.append(rows[:, j] @ basis)
        found = _gram(vocab, torch.stack(proj, dim=1), positions, known)
        if best is None or found[0] < best[0]:
            best = found
    assert best is not None
    return [known.get(i, t) for i, t in enumerate(best[1])]


def refine_procrustes(vocab: Vocabulary, cache_v0: torch.Tensor, positions: list[int],
                      guess: list[int], rounds: int = 3, known: dict[int, int] | None = None
                      ) -> list[int]:
    """Attack 2's last step: fit each slot's transform from guessed tokens to the cached rows
    (orthogonal Procrustes: M = U Vᵀ from the SVD of Σ v_tᵀ c_t — semi-orthogonal hd × D when the
    rows are padded, pads being orthogonal to the true rows' image), undo it, read the rows off
    by nearest neighbour; repeat. Slot → head: the assignment whose fits leave the least residual."""
    cfg = vocab.cfg
    known = known or {}
    n = len(positions)
    rows = _cache_rows(cfg, cache_v0, n)                                        # (n, nkv, D)
    tables = _per_position(vocab, positions)
    nkv = cfg.n_kv_heads
    guess = [known.get(i, t) for i, t in enumerate(guess)]
    for _ in range(rounds):
        if any(t < 0 for t in guess):
            return guess
        truth = torch.stack([tables[i][t] for i, t in enumerate(guess)])        # (n, nkv, hd)
        undone = torch.zeros(nkv, nkv, n, cfg.head_dim)
        resid = torch.zeros(nkv, nkv)
        for j in range(nkv):
            for g in range(nkv):
                u, _, vt = torch.linalg.svd(truth[:, g].double().T @ rows[:, j].double(),
                                            full_matrices=False)
                m = (u @ vt).float()                                            # (hd, D)
                undone[j, g] = rows[:, j] @ m.T
                resid[j, g] = (truth[:, g] @ m - rows[:, j]).pow(2).sum()
        dist = torch.stack([torch.stack([_nearest_dist(undone[j, g], tables, g)
                                         for g in range(nkv)]) for j in range(nkv)])
        new = [known.get(i, t) for i, t in enumerate(_best_assignment(dist))]
        if new == guess:
            break
        guess = new
    return guess


def invert_folded(vocab: Vocabulary, device_wv: torch.Tensor, cache_v0: torch.Tensor,
                  positions: list[int]) -> list[int]:
    """Attack 3 (fold=true): the device's value projection is M_j·W_v[g] per slot j; with the
    public W_v, M_j = W_v'[j]·W_v[g]⁺ for the head g that fits it exactly. The cache's rows are
    then (v + b)·M_jᵀ: undone, and read off by nearest neighbour."""
    cfg = vocab.cfg
    hd, nkv = cfg.head_dim, cfg.n_kv_heads
    w = vocab.weights["layers.0.attn.v.weight"].double()
    wd = device_wv.double()
    n = len(positions)
    rows = _cache_rows(cfg, cache_v0, n).double()
    if rows.shape[-1] != hd or wd.shape != w.shape:
        return [-1] * n
    undone = torch.zeros(n, nkv, hd)
    for j in range(nkv):
        fits = []
        for g in range(nkv):
            m = wd[j * hd:(j + 1) * hd] @ torch.linalg.pinv(w[g * hd:(g + 1) * hd])
            fits.append((float((m @ w[g * hd:(g + 1) * hd] - wd[j * hd:(j + 1) * hd]).norm()), g, m))
        _, g, m = min(fits, key=lambda f: f[0])
        undone[:, g] = (rows[:, j] @ torch.linalg.inv(m.T)).float()
    return invert_values(vocab, undone.transpose(0, 1), positions)


def first_inputs(view_received: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, str] | None:
    """What the device received of layer 0's input, in order, as (N, d) rows and their kind:
    `normed` (the q/k/v projections' input, as the per-op runtime sends it) or `raw` (the token
    embeddings themselves, as a program of kvshield's sends them)."""
    for prefix, kind in (("'layers.0.attn.q'", "normed"), ("program:embeds:", "raw")):
        got = [t.reshape(-1, t.shape[-1]) for name, t in view_received
               if (name.startswith("linear:") and prefix in name) or name.startswith(prefix)]
        if got:
            return torch.cat(got), kind
    return None


def invert_inputs(vocab: Vocabulary, x0: torch.Tensor, positions: list[int], kind: str,
                  rows: str = "normed") -> list[int]:
    """Device view: each received layer-0 input row against the vocabulary's — normed
    embeddings (`rows` "normed"), or the embedding table itself ("raw") — by `nearest`, or by
    `sorted` entries (inputs whose features were permuted)."""
    n = len(positions)
    x = x0[:n].float()
    if x.shape[-1] != vocab.cfg.d_model:
        return [-1] * n
    if kind == "sorted":
        x = x.sort(dim=-1).values

    def table(p: int | None) -> torch.Tensor:
        if rows == "raw":
            t = vocab.weights["embed.weight"].float()
            return t.sort(dim=-1).values if kind == "sorted" else t
        return vocab.sorted_inputs(p) if kind == "sorted" else vocab.inputs(p)

    if vocab.cfg.position != "learned" or rows == "raw":
        return torch.cdist(x, table(None)).argmin(-1).tolist()
    return [int(torch.cdist(x[i:i + 1], table(p)).argmin()) for i, p in enumerate(positions)]


def pad_scale(rows: torch.Tensor, pad_ratio: float) -> torch.Tensor:
    """LoRO's public pad-scale rule (veil/tee/schemes/loro.py): the smallest power of two ≥
    pad_ratio × the row's RMS, per row."""
    v = rows.norm(dim=-1, keepdim=True) * (pad_ratio / rows.shape[-1] ** 0.5) + 1e-30
    return torch.ldexp(torch.ones_like(v), torch.frexp(v)[1])


def invert_fixed_pad(vocab: Vocabulary, x0: torch.Tensor, positions: list[int],
                     known: dict[int, int], pad_ratio: float = 5.5) -> list[int]:
    """Device view of LoRO with a reused pad (`pads="fixed"`, the public code's mode): every
    padded input row is x + s·g with the same g. One known token gives g: its true input row is
    the prior's (the attacker's table), its scale follows the public rule, so
    g = (x̃ − x)/s; then each row is x̃ − s·g for the one power-of-two s that the rule
    reproduces, read off by nearest neighbour. With fresh pads g is new for every row and the
    estimate is noise."""
    n = len(positions)
    x = x0[:n].double()
    if not known or x.shape[-1] != vocab.cfg.d_model:
        return [-1] * n

    def table(p: int) -> torch.Tensor:
        return vocab.inputs(p if vocab.cfg.position == "learned" else None).double()

    g = torch.stack([(x[i] - table(positions[i])[t]) / pad_scale(table(positions[i])[t], pad_ratio)
                     for i, t in known.items() if i < n]).mean(0)
    out = []
    for i in range(n):
        # the pad dominates the row (pad_ratio ≫ 1): |x̃| ≈ s·|g| puts s within a factor of 4
        e0 = int(torch.round(torch.log2(x[i].norm() / g.norm().clamp_min(1e-30))))
        cands = torch.stack([x[i] - 2.0 ** e * g for e in range(e0 - 2, e0 + 3)])
        scales = torch.tensor([2.0 ** e for e in range(e0 - 2, e0 + 3)], dtype=torch.float64)
        consistent = (pad_scale(cands, pad_ratio).squeeze(-1) == scales)
        tab = table(positions[i])
        d = torch.cdist(cands, tab)                                         # (5, V)
        d[~consistent] = float("inf")
        best = d.min(dim=1)
        out.append(int(best.indices[best.values.argmin()]))
    return out


def recovery_rate(predicted: list[int], truth: list[int]) -> float:
    """The share of positions whose token was recovered exactly."""
    assert len(predicted) == len(truth) and truth
    return sum(int(a == b) for a, b in zip(predicted, truth)) / len(truth)


@dataclass(frozen=True)
class InversionResult:
    """One attack on one view: the share of the scored slots read back exactly (slots after the
    known prefix), and what was read (every slot)."""

    attack: str
    recovered: float
    tokens: list[int]


def record(model: str, scheme: str, ids: list[int], max_new_tokens: int, **options: Any
           ) -> tuple[Any, list[int]]:
    """Generate under `scheme`; return the untrusted side's view (veil.tee.device.View; under
    `plain` the host, whose memory holds the plain cache) and the true tokens in its cache slots."""
    if scheme == "plain":
        with veil.load(model) as m:
            tokens = ids + m.generate(ids, max_new_tokens=max_new_tokens,
                                      ignore_eos=True).token_ids[:-1]
            return _host_view(m, tokens), tokens
    _check_device_cache(scheme)
    with veil.load(model, scheme=scheme, record_view=True, **options) as m:
        r = m.generate(ids, max_new_tokens=max_new_tokens, ignore_eos=True)
        return m.device_view(), ids + r.token_ids[:-1]


def _host_view(m: Any, tokens: list[int]) -> View:
    """The host's memory under `plain`: the plain KV cache of `tokens` (one prefill)."""
    cache = m.ops.new_cache(1, len(tokens))
    with torch.inference_mode():
        forward(m.cfg, m.ops, torch.tensor([tokens]),
                Step(torch.arange(len(tokens))[None], None, 0), cache)
    return View({"kv_cache.k": cache.k, "kv_cache.v": cache.v})


def _check_device_cache(scheme: str) -> None:
    if "record_view" not in {f.name for f in fields(schemes.get(scheme).options)}:
        raise UnsupportedError(f"scheme {scheme!r} has no untrusted device holding a KV cache")


def attack_view(vocab: Vocabulary, view: Any, tokens: list[int], which: str = SNAPSHOT,
                known: int = 0) -> list[InversionResult]:
    """Every attack that applies to one view (`snapshot`: resident only; `device`: plus what it
    received); slot i holds position i (an unpadded request). `known`: the first tokens the
    attacker knows (the gram attack's anchors; scored slots start after them for every attack)."""
    n = len(tokens)
    positions = list(range(n))
    anchors = {i: tokens[i] for i in range(min(known, n))}
    found: list[tuple[str, list[int]]] = []
    cache = view.resident.get("kv_cache.v")
    if cache is not None:
        v0 = cache[0, 0]
        found.append(("nearest", invert_values(vocab, v0, positions)))
        if "kv_cache.k" in view.resident:
            found.append(("nearest-keys", invert_keys(vocab, view.resident["kv_cache.k"][0, 0],
                                                      positions)))
        found.append(("sorted", invert_sorted(vocab, v0, positions)))
        found.append(("norms", invert_gram(vocab, v0, positions)))
        if anchors:
            found.append(("gram", invert_gram(vocab, v0, positions, anchors)))
        if v0.shape[-1] != vocab.cfg.head_dim:
            found.append(("pca", invert_pca(vocab, v0, positions, anchors)))
        # each signature attack's guesses refined (the attacker cannot tell which is right)
        found += [(f"procrustes({name})", refine_procrustes(vocab, v0, positions, guess,
                                                            known=anchors))
                  for name, guess in list(found) if name in ("sorted", "norms", "gram", "pca")]
        wv = view.resident.get("layers.0.attn.v.weight")
        if wv is not None:
            found.append(("folded", invert_folded(vocab, wv, v0, positions)))
    if which == DEVICE:
        got = first_inputs(view.received)
        if got is not None:
            x0, rows = got
            found.append(("inputs", invert_inputs(vocab, x0, positions, "nearest", rows)))
            found.append(("inputs-sorted", invert_inputs(vocab, x0, positions, "sorted", rows)))
            if anchors and rows == "normed":
                found.append(("inputs-fixed-pad", invert_fixed_pad(vocab, x0, positions,
                                                                   anchors)))
    scored = slice(min(known, n - 1), n)
    return [InversionResult(a, recovery_rate(t[scored], tokens[scored]), t) for a, t in found]


class Recorder:
    """One scheme loaded once (thread device, recording), and the view of each prompt's prefill:
    the cache slots hold exactly the prompt. What the device received is cleared between prompts,
    so each view is one conversation's."""

    def __init__(self, model: str, scheme: str, **options: Any) -> None:
        if scheme != "plain":
            _check_device_cache(scheme)
        extra = {} if scheme == "plain" else {"record_view": True, "device": "thread"}
        self.scheme = scheme
        self.model = veil.load(model, scheme=scheme, **extra, **options)

    def view(self, ids: list[int]) -> View:
        m = self.model
        if self.scheme == "plain":
            return _host_view(m, ids)
        m.ops.device_state.received.clear()
        m.generate(ids, max_new_tokens=1, ignore_eos=True)        # the prefill fills the cache
        return m.device_view()

    def close(self) -> None:
        self.model.close()
