"""The enclave's executor of the forward algorithm: trusted, small, and the only side with secrets.

It runs the one forward (veil/model/forward.py). Cheap ops — norms, activations, RoPE, residual
adds — run here on enclave-held parameters; the heavy linear work and the attention go to the
device through a `Channel`, concealed by the scheme's `LinearProtocol`, and come back to be
revealed. While the device multiplies, the enclave computes its own share of the work (LoRO's
low-rank correction, and opening the sealed pad products the device sends ahead of its result):
requests are sent first, the scheme's `precompute` runs, then replies are read, so only `reveal`
(one subtraction for LoRO) sits between the device's answer and the next request.

Attention runs on the device under secret head-block transforms (veil/tee/mixing.py): Q·Kᵀ per
head is unchanged, so the device's softmax is exact; the enclave applies RoPE before the transform
and undoes the V transform on the output. A scheme may redraw the transforms at every new KV cache
(`fresh`: one conversation's cache then shares nothing secret with the next one's).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from veil.backends.plain import TorchOps
from veil.cost import SplitCost
from veil.errors import ProtocolAbort
from veil.model.config import ModelConfig
from veil.model.ops import Step
from veil.tee.channel import Channel
from veil.tee.integrity import Freivalds
from veil.tee.mixing import FreshMixings, HeadMixing
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
        device then sends one extra tensor per name, in a frame ahead of its reply)."""

    def precompute(self, name: str, x: torch.Tensor, ctx: Any, fetched: torch.Tensor | None
                   ) -> Any:
        """Enclave work that overlaps the device's matmul (e.g. LoRO's (xB)A and opening the
        pad products `fetched` for this name)."""

    def reveal(self, name: str, y_dev: torch.Tensor, pre: Any, ctx: Any) -> torch.Tensor:
        """The device's output → the true y (the critical path: keep it short)."""

    def table_rows(self, name: str, ids: torch.Tensor, rows_dev: torch.Tensor) -> torch.Tensor:
        """Rows of an obfuscated table (embeddings) → the true rows."""


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
        self.mixing_pad_bytes = 0   # padded mixings: keystream drawn for the pads (finished caches)
        # every layer's mixing drawn anew for each new cache (None: the sealed ones, always)
        self.fresh: FreshMixings | None = None
        self.setup_bytes = 0        # per-conversation set-up traffic (folded weights)

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
            enclave_crypto_bytes=pads.crypto_bytes + self.mixing_pad_bytes
            + sum(p.pad_bytes[0] for p in self.perms),
            enclave_overlap_crypto_bytes=pads.overlap_crypto_bytes,
            device_flops=int(dev.get("flops", 0)), device_busy_s=float(dev.get("busy_s", 0)),
            device_weight_bytes=int(dev.get("resident_bytes", 0)),
            device_store_bytes=int(dev.get("store_bytes", 0)),
            offline_flops=pads.flops, offline_s=pads.seconds, offline_bytes=pads.stored_bytes,
            pad_bytes_used=pads.used_bytes,
            mixing_draws=self.fresh.draws if self.fresh is not None else 0,
            mixing_draw_s=self.fresh.seconds if self.fresh is not None else 0.0,
            setup_bytes=self.setup_bytes)

    def wipe(self) -> None:
        """Zero the secrets this enclave made: head mixings (those drawn ahead too), check vectors,
        the protocol's."""
        if self.fresh is not None:
            self.fresh.close()
        for p in self.perms:
            p.wipe()
        if self.verifier is not None:
            self.verifier.wipe()
        self.protocol.wipe()

    def new_cache(self, batch: int, capacity: int) -> None:
        c = self.cfg
        if self.fresh is not None:
            fresh = self.fresh.take()
            for p in self.perms:
                self.mixing_pad_bytes += p.pad_bytes[0]
                p.wipe()
            self.perms = fresh
        width = self.perms[0].width(c.head_dim) if self.perms else 0
        self.channel.call("cache", layers=c.n_layers, batch=batch, capacity=capacity,
                          kv_heads=c.n_kv_heads, head_dim=c.head_dim + width)
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
        k = len(names)
        fetched: list[torch.Tensor | None] = [None] * k
        if args:
            # the device sends what it fetched before it multiplies: opening it overlaps the device
            early = self.channel.recv()
            if early.op != "pads" or len(early.tensors) != k:
                raise ProtocolAbort(f"linear {group}: the device sent {early.op!r} with "
                                    f"{len(early.tensors)} tensors, expected the {k} fetched rows")
            fetched = list(early.tensors)
        pre = [self.protocol.precompute(n, flat, ctx, f) for n, f in zip(names, fetched)]
        outs = self.channel.reply().tensors
        if len(outs) != k:
            raise ProtocolAbort(f"linear {group}: the device sent {len(outs)} tensors, expected {k}")
        if self.verifier is not None:
            for n, y in zip(names, outs):
                self.verifier.check_linear(n, x_dev, y)
        return tuple(self.protocol.reveal(n, y, p, ctx).view(*lead, -1)
                     for n, y, p in zip(names, outs, pre))

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.linears(x, (name,))[0]

    def mix_in(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> list[torch.Tensor]:
        """Q, K, V as the device may see them (this layer's head mixing), its cost counted: one
        D×D product per head and token when the mixing rotates."""
        mix, c = self.perms[layer], self.cfg
        D = c.head_dim + mix.width(c.head_dim)
        if mix.rotates:
            self.mixing_flops += 2 * q.shape[0] * q.shape[1] * (c.n_heads + 2 * c.n_kv_heads) * D * D
        return list(mix.conceal(q, k, v, c.head_dim))

    def mix_out(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """The device's attention output back to the true heads, its cost counted."""
        mix, c = self.perms[layer], self.cfg
        D = c.head_dim + mix.width(c.head_dim)
        if mix.rotates:
            self.mixing_flops += 2 * out.shape[0] * out.shape[1] * c.n_heads * D * D
        return mix.reveal(out, c.head_dim)                                # (B, T, nh*hd)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  step: Step, cache: Any) -> torch.Tensor:
        c = self.cfg
        hd = c.head_dim
        tensors = self.mix_in(layer, q, k, v)
        if step.key_valid is not None:
            tensors.append(step.key_valid)
        out = self.channel.call("attention", tensors, layer=layer, start=step.start,
                                n_heads=c.n_heads, head_dim=hd + self.perms[layer].width(hd),
                                scale=1 / math.sqrt(hd)).tensors[0]
        return self.mix_out(layer, out)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        name = "embed" if self.cfg.tie_embeddings else "lm_head"
        return self.linear(x, name)                                       # (B, T, V)
