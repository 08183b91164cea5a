"""The enclave's executor of the forward algorithm: trusted, small, and the only side with secrets.

It runs the one forward (veil/model/forward.py). Cheap ops — norms, activations, RoPE, residual
adds — run here on enclave-held parameters; the heavy linear work and the attention go to the
device through a `Channel`, concealed by the scheme's `LinearProtocol`, and come back to be
revealed. While the device multiplies, the enclave computes its own share of the work (LoRO's
low-rank correction): requests are sent first, the scheme's `precompute` runs, then replies are read.

Attention runs on the device under secret head-block transforms (`HeadMixing`): per layer a
permutation of the KV heads and of the query heads inside each group, and inside each group an
orthogonal matrix for Q/K and another for V. Q·Kᵀ per head is unchanged, so the device's softmax
is exact; the enclave applies RoPE *before* the transform (neither a permutation nor a rotation
commutes with RoPE's frequency pairs, and RoPE done on the device would reveal the pairing), and
undoes the V transform on the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from veil.backends.plain import TorchOps
from veil.cost import SplitCost
from veil.csprng import SecretRng
from veil.errors import ProtocolAbort
from veil.model.config import ModelConfig
from veil.model.ops import Step
from veil.tee.channel import Channel
from veil.tee.integrity import Freivalds
from veil.tee.pads import PadCost
from veil.tee.wire import Message


class LinearProtocol(Protocol):
    """How a scheme hides a linear layer y = x Wᵀ + b from the device holding its W'.

    enclave_flops / overlap_flops: running totals of the protocol's own work in the enclave, and
    the part of it done while the device computes (`precompute`)."""

    enclave_flops: int
    overlap_flops: int

    def prepare(self, rows: int) -> None:
        """Offline work before a generation of `rows` rows (LoRO: the pads' products)."""

    def pad_cost(self) -> PadCost | None:
        """The offline pad work so far (None for a protocol without pads)."""

    def nbytes(self) -> int:
        """Enclave memory the protocol holds beyond the model's local parameters."""

    def wipe(self) -> None:
        """Zero the protocol's secrets (the session is over)."""

    def conceal(self, group: str, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(N, in) true input → (what the device receives, private context)."""

    def request_args(self, ctx: Any) -> dict:
        """Extra arguments for the device's linear request (e.g. LoRO's pad-store fetch: the
        device then appends one extra tensor per name to its reply)."""

    def precompute(self, name: str, x: torch.Tensor, ctx: Any) -> Any:
        """Enclave work that overlaps the device's matmul (e.g. LoRO's (xB)A)."""

    def reveal(self, name: str, y_dev: torch.Tensor, pre: Any, ctx: Any,
               fetched: torch.Tensor | None) -> torch.Tensor:
        """The device's output (and the extra tensor fetched for this name) → the true y."""

    def table_rows(self, name: str, ids: torch.Tensor, rows_dev: torch.Tensor) -> torch.Tensor:
        """Rows of an obfuscated table (embeddings) → the true rows."""


def _orthogonal(n: int, kind: str, rng: SecretRng) -> torch.Tensor:
    """A secret n×n orthogonal matrix: Haar-random (`rotate`) or a uniform permutation (`permute`).

    QR of a Gaussian matrix alone is not Haar (its Q depends on LAPACK's sign convention for R);
    scaling Q's columns by sign(diag R) makes R's diagonal positive, and then Q is Haar."""
    if kind == "permute":
        return torch.eye(n)[rng.perm(n)]
    q, r = torch.linalg.qr(rng.randn(n, n, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


@dataclass(frozen=True)
class HeadMixing:
    """One layer's secret transform of attention inputs, exact for the device's softmax(QKᵀ)V.

    Device head slot i holds true query head `q_heads[i]` (KV head `k_heads[j]` for slot j): the
    KV heads are permuted, and the query heads with them (GQA groups stay together) and within
    their group. Inside a group g, Q and K are multiplied by one orthogonal R_g (Q R_g (K R_g)ᵀ =
    QKᵀ) and V by another, S_g, which the enclave removes from the output (· S_gᵀ).
    `permute` uses permutation matrices for R_g, S_g (KV-Shield's RPM, LoRO's head-block
    permutations); `rotate` uses Haar-random rotations, which also mix feature values.
    """

    q_heads: torch.Tensor    # (nh,)  true query head in each device slot
    k_heads: torch.Tensor    # (nkv,) true KV head in each device slot
    r: torch.Tensor          # (nkv, hd, hd)  R of the group in each KV slot j (for Q and K)
    s: torch.Tensor          # (nkv, hd, hd)  S of the group in each KV slot j (for V)

    def __post_init__(self) -> None:
        # derived, not sealed: the inverse query permutation, and S per slot transposed (= S⁻¹)
        object.__setattr__(self, "_q_inv", torch.argsort(self.q_heads))
        object.__setattr__(self, "_s_t", self.s.transpose(-1, -2))
        # permutation matrices are gathers on real hardware: data movement, no FLOPs counted
        object.__setattr__(self, "rotates", bool(((self.r != 0) & (self.r != 1)).any()))

    @staticmethod
    def sample(cfg: ModelConfig, kind: str = "rotate", calib: dict[str, torch.Tensor] | None = None,
               tol: float = 0.05, rng: SecretRng | None = None) -> "HeadMixing":
        """Draw a layer's transform from `rng` (a fresh `SecretRng` when None).

        calib: true q, k, v rows (N, features) of this layer on calibration input. A random
        orthogonal matrix aligns by chance with the data's dominant directions (|cos| between a
        64-dim head and its transform has a spread of ~0.1); with calibration, each R_g and S_g
        is redrawn until that alignment is below `tol`, so the device's copy is decorrelated
        from the true tensors, not just scrambled. The constraint is one scalar per matrix."""
        nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        G = nh // nkv
        rng = SecretRng() if rng is None else rng
        sigma = rng.perm(nkv)                         # slot j ← true KV head sigma[j]
        q_heads = torch.cat([sigma[j] * G + rng.perm(G) for j in range(nkv)])

        def cross(x: torch.Tensor, n_heads: int, slots: torch.Tensor) -> list[torch.Tensor]:
            """Per true head g: Σ over slots holding g of (slot's true rows)ᵀ(g's rows), normalised."""
            h = x.double().reshape(-1, n_heads, hd)
            out = [torch.zeros(hd, hd, dtype=torch.float64) for _ in range(nkv)]
            for slot, src in enumerate(slots.tolist()):
                c = h[:, slot].t() @ h[:, src]
                out[src // (n_heads // nkv)] += c / (h[:, slot].norm() * h[:, src].norm() + 1e-30)
            return out

        def draw(constraints: list[torch.Tensor]) -> torch.Tensor:
            best, best_score = None, float("inf")
            for _ in range(200):
                m = _orthogonal(hd, kind, rng)
                score = max((float((c * m.double().t()).sum().abs()) for c in constraints), default=0.0)
                if score < best_score:
                    best, best_score = m, score
                if score < tol:
                    break
            assert best is not None
            return best

        if calib is not None:
            ck, cq, cv = (cross(calib["k"], nkv, sigma), cross(calib["q"], nh, q_heads),
                          cross(calib["v"], nkv, sigma))
            R = [draw([ck[g], cq[g]]) for g in range(nkv)]
            S = [draw([cv[g]]) for g in range(nkv)]
        else:
            R = [_orthogonal(hd, kind, rng) for _ in range(nkv)]
            S = [_orthogonal(hd, kind, rng) for _ in range(nkv)]
        # stored in slot order: slot j holds true KV group sigma[j]
        return HeadMixing(q_heads, sigma, torch.stack([R[g] for g in sigma.tolist()]),
                          torch.stack([S[g] for g in sigma.tolist()]))

    # Device slots come in groups: slots j·G … j·G+G−1 all hold query heads of the true KV group in
    # KV slot j (see `sample`), so each slot's matrix applies to a (…, G, hd) block by
    # broadcasting — no per-query-slot copies of the matrices.
    def conceal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hd: int):
        B, T, _ = q.shape
        nkv = len(self.k_heads)
        qd = q.view(B, T, -1, hd)[:, :, self.q_heads].view(B, T, nkv, -1, hd) @ self.r
        kd = k.view(B, T, nkv, hd)[:, :, self.k_heads, None] @ self.r
        vd = v.view(B, T, nkv, hd)[:, :, self.k_heads, None] @ self.s
        return qd.view(B, T, -1), kd.view(B, T, -1), vd.view(B, T, -1)

    def reveal(self, out: torch.Tensor, hd: int) -> torch.Tensor:
        B, T, _ = out.shape
        nkv = len(self.k_heads)
        oh = (out.view(B, T, nkv, -1, hd) @ self._s_t).view(B, T, -1, hd)    # · S⁻¹ per slot
        return oh[:, :, self._q_inv].view(B, T, -1)                         # back to true order

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.q_heads, self.k_heads, self.r, self.s))

    def wipe(self) -> None:
        for t in (self.q_heads, self.k_heads, self.r, self.s, self._q_inv, self._s_t):
            t.zero_()


_MIXING_FIELDS = ("q_heads", "k_heads", "r", "s")


def seal_mixings(perms: list[HeadMixing]) -> dict[str, torch.Tensor]:
    """Per-layer head mixings as named tensors for a sealed file ("mix.<layer>.<field>")."""
    return {f"mix.{i}.{f}": getattr(p, f) for i, p in enumerate(perms) for f in _MIXING_FIELDS}


def unseal_mixings(t: dict[str, torch.Tensor], layers: int) -> list[HeadMixing]:
    return [HeadMixing(*(t[f"mix.{i}.{f}"] for f in _MIXING_FIELDS)) for i in range(layers)]


class EnclaveOps(TorchOps):
    """Ops for the enclave: local elementwise work, device calls for linears and attention."""

    name = "tee"
    # the device's attention is softmax attention over its cache, and its caller the step loop
    support = {**TorchOps.support, "attention": frozenset({"softmax"}),
               "generation": frozenset({"standard"})}

    def __init__(self, cfg: ModelConfig, local: dict[str, torch.Tensor], protocol: LinearProtocol,
                 perms: list[HeadMixing], channel: Channel, scheme: str,
                 verifier: Freivalds | None = None) -> None:
        super().__init__(cfg, local)
        self.protocol, self.perms, self.channel = protocol, perms, channel
        self.name = scheme
        self.verifier = verifier
        self.mixing_flops = 0       # head-mixing matmuls (enclave, on the critical path)

    def cost_counters(self) -> SplitCost:
        """Running totals of this enclave's traffic and work, and the device's as it reports
        them."""
        dev = self.channel.call_uncounted("stats").args
        st = self.channel.stats
        pads = self.protocol.pad_cost() or PadCost()
        return SplitCost(
            bytes_sent=st.bytes_sent, bytes_received=st.bytes_received,
            round_trips=st.round_trips, enclave_wait_s=st.wait_s,
            enclave_flops=self.protocol.enclave_flops + self.mixing_flops,
            enclave_overlap_flops=self.protocol.overlap_flops,
            enclave_crypto_bytes=pads.crypto_bytes,
            device_flops=int(dev.get("flops", 0)), device_busy_s=float(dev.get("busy_s", 0)),
            device_weight_bytes=int(dev.get("resident_bytes", 0)),
            device_store_bytes=int(dev.get("store_bytes", 0)),
            offline_flops=pads.flops, offline_s=pads.seconds, offline_bytes=pads.stored_bytes,
            pad_bytes_used=pads.used_bytes)

    def wipe(self) -> None:
        """Zero the secrets this enclave made: head mixings, check vectors, the protocol's."""
        for p in self.perms:
            p.wipe()
        if self.verifier is not None:
            self.verifier.wipe()
        self.protocol.wipe()

    def new_cache(self, batch: int, capacity: int) -> None:
        c = self.cfg
        self.channel.call("cache", layers=c.n_layers, batch=batch, capacity=capacity,
                          kv_heads=c.n_kv_heads, head_dim=c.head_dim)
        self.protocol.prepare(batch * capacity)
        return None

    def _rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64)
        rows = self.channel.call("rows", [flat], name=f"{name}.weight").tensors[0]
        if self.verifier is not None:
            self.verifier.check_rows(name, flat, rows)
        return self.protocol.table_rows(name, flat, rows).view(*ids.shape, -1)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._rows("embed", ids)                                   # (B, T, d)

    def pos_embed(self, positions: torch.Tensor) -> torch.Tensor:
        return self._rows("pos_embed", positions)                         # (B, T, d)

    def linears(self, x: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])                                 # (N, in)
        group = names[0]
        x_dev, ctx = self.protocol.conceal(group, flat)
        args = self.protocol.request_args(ctx)
        self.channel.send(Message("linear", {"names": list(names), **args}, [x_dev]))
        pre = [self.protocol.precompute(n, flat, ctx) for n in names]    # overlaps the device
        reply = self.channel.reply().tensors
        k = len(names)
        if len(reply) != (2 * k if args else k):
            raise ProtocolAbort(f"linear {group}: the device sent {len(reply)} tensors, "
                                f"expected {2 * k if args else k}")
        outs, fetched = reply[:k], (reply[k:] if args else [None] * k)
        if self.verifier is not None:
            for n, y in zip(names, outs):
                self.verifier.check_linear(n, x_dev, y)
        return tuple(self.protocol.reveal(n, y, p, ctx, f).view(*lead, -1)
                     for n, y, p, f in zip(names, outs, pre, fetched))

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.linears(x, (name,))[0]

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  step: Step, cache: Any) -> torch.Tensor:
        c = self.cfg
        hd = c.head_dim
        # Q, K, V in and the output back, one hd×hd product per head and token
        if self.perms[layer].rotates:
            self.mixing_flops += 2 * q.shape[0] * q.shape[1] * (2 * c.n_heads + 2 * c.n_kv_heads) * hd * hd
        tensors = list(self.perms[layer].conceal(q, k, v, hd))
        if step.key_valid is not None:
            tensors.append(step.key_valid)
        out = self.channel.call("attention", tensors, layer=layer, start=step.start,
                                n_heads=self.cfg.n_heads, head_dim=self.cfg.head_dim).tensors[0]
        return self.perms[layer].reveal(out, hd)                          # (B, T, nh*hd)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        name = "embed" if self.cfg.tie_embeddings else "lm_head"
        return self.linear(x, name)                                       # (B, T, V)
