"""The untrusted device: holds what a scheme lets it hold and does the heavy linear work it is asked.

It knows nothing about schemes. It stores named tensors (obfuscated weights), multiplies inputs by
them, runs attention on whatever Q/K/V it is sent while keeping the K/V it saw in its own cache,
and — because security is what this side can see — can record every tensor it received and
everything resident in its memory (`View`). Attacks and audits take a `View` and nothing else.

Ops (request → reply):
  put      tensors named by args.names → stored (resident)              → ok
  linear   args.names, x (N, in)       → [x W_nᵀ + b_n for each name]   (one round trip for several)
           [args.fetch = [start, n]: followed by rows start…start+n of "pads.<name>" for each name]
  stash    args.names/start/capacity, blobs (n, L) uint8 → rows start… of opaque row stores
           (capacity rows each; LoRO's sealed pad products, veil/tee/pads.py)   → ok
  rows     args.name, ids (N,)         → rows of a stored table (embedding lookups)
  cache    args.layers/batch/capacity/kv_heads/head_dim → a fresh KV cache (resident)
  attention args.layer/start/n_heads/head_dim[/scale], q (B,T,nh·hd), k, v (B,T,nkv·hd)[, key_valid (B,S)]
                                       → softmax(q kᵀ·scale) v (B,T,nh·hd), with k, v appended to the
                                       cache (scale: 1/√hd by default; padded head vectors are
                                       longer than the ones whose scores they carry)
  view     → every resident tensor and, if recording, every received tensor
  stats    → the device's FLOPs, busy seconds, resident weight bytes and opaque store bytes
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from veil.backends.plain import attention_mask
from veil.errors import ProtocolAbort
from veil.model.ops import Step
from veil.tee.channel import ERROR_OP, Channel
from veil.tee.wire import Message


@dataclass
class View:
    """What the untrusted side saw: resident tensors by name, and the log of received tensors."""

    resident: dict[str, torch.Tensor] = field(default_factory=dict)
    received: list[tuple[str, torch.Tensor]] = field(default_factory=list)


class DeviceState:
    """The device's memory and its op handlers (transport-independent)."""

    def __init__(self, record: bool = False) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None
        self.record = record
        self.received: list[tuple[str, torch.Tensor]] = []
        self.flops = 0
        self.busy_s = 0.0       # time spent computing replies (not waiting for requests)

    def handle(self, msg: Message) -> Message:
        handler = getattr(self, f"_op_{msg.op}", None)
        if handler is None:
            raise ProtocolAbort(f"unknown op {msg.op!r}")
        # put/stash data stays resident and shows in the view as such
        if self.record and msg.op not in ("put", "stash", "view", "ping", "stats"):
            for i, t in enumerate(msg.tensors):
                self.received.append((f"{msg.op}:{msg.args.get('names', msg.args.get('layer', ''))}:{i}", t))
        if msg.op in ("put", "stash", "view", "ping", "stats"):   # set-up and bookkeeping
            return handler(msg)
        t0 = time.perf_counter()
        try:
            return handler(msg)
        finally:
            self.busy_s += time.perf_counter() - t0

    def _need(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ProtocolAbort(f"no tensor {name!r} on the device")
        return self.tensors[name]

    def _op_ping(self, msg: Message) -> Message:
        return Message("ok")

    def _op_stats(self, msg: Message) -> Message:
        """The device's own counters (it reports them; the enclave cannot measure them)."""
        stores = sum(t.nbytes for n, t in self.tensors.items() if t.dtype == torch.uint8)
        return Message("stats", {"flops": self.flops, "busy_s": self.busy_s,
                                 "resident_bytes": sum(t.nbytes for t in self.tensors.values()) - stores,
                                 "store_bytes": stores})

    def _op_put(self, msg: Message) -> Message:
        names = msg.args.get("names", [])
        if len(names) != len(msg.tensors):
            raise ProtocolAbort("put: names and tensors differ in number")
        self.tensors.update(zip(names, msg.tensors))
        return Message("ok")

    def _op_linear(self, msg: Message) -> Message:
        (x,) = msg.tensors
        out = []
        for name in msg.args["names"]:
            w = self._need(f"{name}.weight")
            if x.shape[-1] != w.shape[1]:
                raise ProtocolAbort(f"linear {name}: input has {x.shape[-1]} features, weight takes {w.shape[1]}")
            out.append(F.linear(x, w, self.tensors.get(f"{name}.bias")))
            self.flops += 2 * x[..., 0].numel() * w.numel()
        if "fetch" in msg.args:
            start, n = (int(v) for v in msg.args["fetch"])
            for name in msg.args["names"]:
                store = self._need(f"pads.{name}")
                if start < 0 or n < 0 or start + n > store.shape[0]:
                    raise ProtocolAbort(f"linear {name}: fetch rows {start}+{n} outside the store "
                                        f"({store.shape[0]} rows)")
                out.append(store[start:start + n])
        return Message("linear", {}, out)

    def _op_stash(self, msg: Message) -> Message:
        a = msg.args
        names, start, capacity = a.get("names", []), int(a.get("start", 0)), int(a.get("capacity", 0))
        if len(names) != len(msg.tensors):
            raise ProtocolAbort("stash: names and tensors differ in number")
        for name, blob in zip(names, msg.tensors):
            if blob.dtype != torch.uint8 or blob.dim() != 2 or not 0 <= start <= capacity - blob.shape[0]:
                raise ProtocolAbort(f"stash {name}: need uint8 rows inside {capacity} rows")
            store = self.tensors.get(name)
            if store is None or store.shape != (capacity, blob.shape[1]):
                store = self.tensors[name] = torch.zeros(capacity, blob.shape[1], dtype=torch.uint8)
            store[start:start + blob.shape[0]] = blob
        return Message("ok")

    def _op_rows(self, msg: Message) -> Message:
        """Rows of a stored table (embedding lookups): ids (N,) → (N, d)."""
        (ids,) = msg.tensors
        table = self._need(msg.args["name"])
        if ids.dtype != torch.int64 or (ids.numel() and (ids.min() < 0 or ids.max() >= table.shape[0])):
            raise ProtocolAbort(f"rows {msg.args['name']}: ids must be int64 in [0, {table.shape[0]})")
        return Message("rows", {}, [table[ids]])

    def _op_cache(self, msg: Message) -> Message:
        a = msg.args
        shape = (a["layers"], a["batch"], a["kv_heads"], a["capacity"], a["head_dim"])
        self.cache_k, self.cache_v = torch.zeros(shape), torch.zeros(shape)
        return Message("ok")

    def _op_attention(self, msg: Message) -> Message:
        if self.cache_k is None or self.cache_v is None:
            raise ProtocolAbort("attention before a cache was created")
        a = msg.args
        q, k, v = msg.tensors[:3]
        key_valid = msg.tensors[3] if len(msg.tensors) > 3 else None
        layer, start, nh, hd = a["layer"], a["start"], a["n_heads"], a["head_dim"]
        B, T, _ = q.shape
        nkv = self.cache_k.shape[2]
        end = start + T
        if end > self.cache_k.shape[3] or layer >= self.cache_k.shape[0]:
            raise ProtocolAbort(f"attention: slot {end} / layer {layer} outside the cache")
        self.cache_k[layer, :, :, start:end] = k.view(B, T, nkv, hd).transpose(1, 2)
        self.cache_v[layer, :, :, start:end] = v.view(B, T, nkv, hd).transpose(1, 2)
        mask = attention_mask(Step(None, key_valid, start), T, end)
        out = F.scaled_dot_product_attention(
            q.view(B, T, nh, hd).transpose(1, 2), self.cache_k[layer, :, :, :end],
            self.cache_v[layer, :, :, :end], attn_mask=mask, is_causal=mask is None and T > 1,
            enable_gqa=nkv != nh, scale=a.get("scale"))
        self.flops += 4 * B * T * nh * hd * end
        return Message("attention", {}, [out.transpose(1, 2).reshape(B, T, nh * hd)])

    def view(self) -> View:
        resident = dict(self.tensors)
        if self.cache_k is not None and self.cache_v is not None:
            resident["kv_cache.k"], resident["kv_cache.v"] = self.cache_k, self.cache_v
        return View(resident, list(self.received))

    def _op_view(self, msg: Message) -> Message:
        """One page of the view (a frame carries at most 64 tensors): args.offset → names, tensors
        and the total count."""
        v = self.view()
        items = list(v.resident.items()) + [(f"received/{n}", t) for n, t in v.received]
        start = int(msg.args.get("offset", 0))
        page = items[start:start + 32]
        return Message("view", {"names": [n for n, _ in page], "total": len(items)}, [t for _, t in page])


def serve(channel: Channel, state: DeviceState) -> None:
    """Answer requests until the enclave closes the channel. A bad request is reported back to the
    enclave (op "error") and ends the session: a confused device must not keep computing."""
    while True:
        try:
            msg = channel.recv()
        except ProtocolAbort:
            return
        try:
            reply = state.handle(msg)
        except (ProtocolAbort, KeyError, ValueError, RuntimeError, TypeError) as exc:
            reply = Message(ERROR_OP, {"message": f"{msg.op}: {exc}"})
        try:
            channel.send(reply)
        except ProtocolAbort:
            return  # the enclave is gone: nothing left to serve
        if reply.op == ERROR_OP:
            return


# The device only answers: it waits for the enclave's next request as long as the enclave lives
# (a user may pause between generations), and the socket's EOF — the enclave closed or died —
# ends it. The enclave's side keeps a short timeout: a device that stalls mid-request is an error.
ENCLAVE_WAIT_S = 24 * 3600.0


def serve_in_thread(state: DeviceState, timeout_s: float = 30.0) -> tuple[Channel, threading.Thread]:
    """In-process mode: the device answers over a socketpair from a daemon thread — the same
    framing and counting as a separate process, without the process. `timeout_s` bounds the
    enclave's wait for a reply."""
    a, b = socket.socketpair()
    thread = threading.Thread(target=serve, args=(Channel(b, ENCLAVE_WAIT_S, "enclave"), state),
                              daemon=True, name="veil-device")
    thread.start()
    return Channel(a, timeout_s, "device"), thread
