"""The untrusted device: holds what a scheme lets it hold and does the heavy linear work it is asked.

It knows nothing about schemes. It stores named tensors (obfuscated weights), multiplies inputs by
them, runs attention on whatever Q/K/V it is sent while keeping the K/V it saw in its own cache,
and — because security is what this side can see — can record every tensor it received and
everything resident in its memory (`View`). Attacks and audits take a `View` and nothing else.

Ops (request → reply):
  put      tensors named by args.names → stored (resident)              → ok
  linear   args.names, x (N, in)       → [x W_nᵀ + b_n for each name]   (one round trip for several)
           [args.fetch = [start, n]: rows start…start+n of "pads.<name>" for each name, sent as
           a frame of their own ("pads") *before* the device multiplies — the enclave opens them
           while the device computes — then the reply]
  stash    args.names/start/capacity, blobs (n, L) uint8 → rows start… of opaque row stores
           (capacity rows each; LoRO's sealed pad products, veil/tee/pads.py)   → ok
  rows     args.name, ids (N,)         → rows of a stored table (embedding lookups)
  cache    args.layers/batch/capacity/kv_heads/head_dim → a fresh KV cache (resident)
  attention args.layer/start/n_heads/head_dim[/scale], q (B,T,nh·hd), k, v (B,T,nkv·hd)[, key_valid (B,S)]
                                       → softmax(q kᵀ·scale) v (B,T,nh·hd), with k, v appended to the
                                       cache (scale: 1/√hd by default; padded head vectors are
                                       longer than the ones whose scores they carry)
  configure args.config (the public HF config) → the device can run the public model's own ops
  program  args.steps/outputs/free/labels/clear, input tensors → the values of `outputs` after running
           `steps` (norm, linears, rope, activation, mul, add, last_position on its public
           weights; attention on its cache) over values it keeps between programs until `free`d
           (veil/tee/deferred.py: a scheme whose device holds public weights sends each layer's
           device work as one program)
  view     → every resident tensor and, if recording, every received tensor
  stats    → the device's FLOPs, busy seconds, resident weight bytes and opaque store bytes
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from veil.backends.plain import TorchOps, attention_mask
from veil.errors import ProtocolAbort
from veil.model.config import config_from_hf
from veil.model.ops import Step
from veil.tee.channel import ERROR_OP, Channel
from veil.tee.wire import Message


@dataclass
class View:
    """What the untrusted side saw: resident tensors by name, and the log of received tensors."""

    resident: dict[str, torch.Tensor] = field(default_factory=dict)
    received: list[tuple[str, torch.Tensor]] = field(default_factory=list)


_BOOKKEEPING = ("put", "stash", "view", "ping", "stats", "configure")
# what a program may run: the public model's own ops (TorchOps) and attention on the cache
_PROGRAM_OPS = frozenset({"norm", "linears", "rope", "activation", "mul", "add", "last_position",
                          "attention"})


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
        self.executor: TorchOps | None = None       # after `configure`
        self.values: dict[int, torch.Tensor] = {}   # a program's values, kept until freed
        self._early: Callable[[Message], None] | None = None

    def handle(self, msg: Message, early: Callable[[Message], None] | None = None) -> Message:
        """The reply to `msg`. `early`: sends a frame ahead of the reply (op `linear`'s fetched
        pad rows); without it they are appended to the reply."""
        self._early = early
        handler = getattr(self, f"_op_{msg.op}", None)
        if handler is None:
            raise ProtocolAbort(f"unknown op {msg.op!r}")
        # put/stash data stays resident and shows in the view as such
        if self.record and msg.op not in _BOOKKEEPING:
            labels = msg.args.get("labels") or []
            for i, t in enumerate(msg.tensors):
                what = labels[i] if i < len(labels) else msg.args.get('names', msg.args.get('layer', ''))
                self.received.append((f"{msg.op}:{what}:{i}", t))
        if msg.op in _BOOKKEEPING:   # set-up and bookkeeping
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
        names = msg.args["names"]
        weights = [self._need(f"{name}.weight") for name in names]
        for name, w in zip(names, weights):
            if x.shape[-1] != w.shape[1]:
                raise ProtocolAbort(f"linear {name}: input has {x.shape[-1]} features, weight takes {w.shape[1]}")
        fetched = []
        if "fetch" in msg.args:
            start, n = (int(v) for v in msg.args["fetch"])
            for name in names:
                store = self._need(f"pads.{name}")
                if start < 0 or n < 0 or start + n > store.shape[0]:
                    raise ProtocolAbort(f"linear {name}: fetch rows {start}+{n} outside the store "
                                        f"({store.shape[0]} rows)")
                fetched.append(store[start:start + n])
            if self._early is not None:
                self._early(Message("pads", {}, fetched))
                fetched = []
        out = []
        for name, w in zip(names, weights):
            out.append(F.linear(x, w, self.tensors.get(f"{name}.bias")))
            self.flops += 2 * x[..., 0].numel() * w.numel()
        return Message("linear", {}, out + fetched)

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
        self.values.clear()                 # a new conversation: nothing of the last one is live
        return Message("ok")

    def _op_attention(self, msg: Message) -> Message:
        if self.cache_k is None:
            raise ProtocolAbort("attention before a cache was created")
        a = msg.args
        q, k, v = msg.tensors[:3]
        key_valid = msg.tensors[3] if len(msg.tensors) > 3 else None
        out = self._attend(q, k, v, key_valid, a["layer"], a["start"], a["n_heads"], a["head_dim"],
                           a.get("scale"))
        return Message("attention", {}, [out])

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_valid: torch.Tensor | None, layer: int, start: int, nh: int, hd: int,
                scale: float | None) -> torch.Tensor:
        """softmax(q kᵀ·scale) v over the cache, k and v appended at slot `start`."""
        if self.cache_k is None or self.cache_v is None:
            raise ProtocolAbort("attention before a cache was created")
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
            enable_gqa=nkv != nh, scale=scale)
        self.flops += 4 * B * T * nh * hd * end
        return out.transpose(1, 2).reshape(B, T, nh * hd)

    def _op_configure(self, msg: Message) -> Message:
        self.executor = TorchOps(config_from_hf(dict(msg.args["config"])), self.tensors)
        return Message("ok")

    def _op_program(self, msg: Message) -> Message:
        """Run a program of public-model ops (see the module docstring), then forget the values
        in `free` (all of them with `clear`: the forward is over). Inputs: a value id ≥ 0, or −1 − i for the message's i-th tensor."""
        ex = self.executor
        if ex is None:
            raise ProtocolAbort("program before configure")
        a = msg.args

        def arg(ref: int) -> torch.Tensor:
            if ref < 0:
                if -1 - ref >= len(msg.tensors):
                    raise ProtocolAbort(f"program: no input tensor {-1 - ref}")
                return msg.tensors[-1 - ref]
            if ref not in self.values:
                raise ProtocolAbort(f"program: no value {ref}")
            return self.values[ref]

        for step in a["steps"]:
            op, ins, outs = step["op"], [arg(int(r)) for r in step["in"]], step["out"]
            if op not in _PROGRAM_OPS:
                raise ProtocolAbort(f"program: op {op!r} is not one the device runs")
            if op == "linears":
                names = tuple(step["names"])
                for n in names:
                    w = self._need(f"{n}.weight")
                    if ins[0].shape[-1] != w.shape[1]:
                        raise ProtocolAbort(f"linear {n}: input has {ins[0].shape[-1]} features, "
                                            f"weight takes {w.shape[1]}")
                    self.flops += 2 * ins[0][..., 0].numel() * w.numel()
                got = ex.linears(ins[0], names)
            elif op == "norm":
                got = (ex.norm(ins[0], step["name"]),)
            elif op == "rope":
                got = ex.rope(ins[0], ins[1], Step(ins[2], None, 0))
            elif op == "attention":
                got = (self._attend(ins[0], ins[1], ins[2], ins[3] if len(ins) > 3 else None,
                                    step["layer"], step["start"], step["n_heads"],
                                    step["head_dim"], step.get("scale")),)
            else:
                got = (getattr(ex, op)(*ins),)
            if len(got) != len(outs):
                raise ProtocolAbort(f"program: {op} gives {len(got)} values, not {len(outs)}")
            self.values.update(zip((int(o) for o in outs), got))
        out = [arg(int(r)) for r in a["outputs"]]
        # freed after the steps: a value the enclave dropped may still feed this program
        for i in a.get("free", []):
            self.values.pop(int(i), None)
        if a.get("clear"):                  # the enclave's forward is over
            self.values.clear()
        return Message("program", {}, out)

    def view(self) -> View:
        resident = dict(self.tensors)
        if self.cache_k is not None and self.cache_v is not None:
            resident["kv_cache.k"], resident["kv_cache.v"] = self.cache_k, self.cache_v
        resident.update({f"value.{i}": t for i, t in self.values.items()})
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
            reply = state.handle(msg, channel.send)
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
