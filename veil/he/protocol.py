"""The `he` scheme's two parties and the messages between them (veil's wire frames: a JSON header
and raw bytes; ciphertexts and keys in SEAL's own serialisation, validated by SEAL on load —
never pickle).

    client → server   setup    {params, T, C}  [public key, relin keys, Galois keys]
    server → client   ready
    client → server   forward  {n}             [the prompt's embeddings, encrypted, per chunk]
    server → client   refresh  {kind, n, width} [ciphertexts, masked unless kind = rms]   (0+ times)
    client → server   refreshed                 [the same values, freshly encrypted]
    server → client   result   {cost}           [the last position's hidden state, encrypted]
    client → server   bye

The client holds the secret key, the token embedding table and the final norm (it embeds its
tokens and reads the logits); the server holds the transformer's layers in plaintext.
A peer that stops answering ends the run with `ProtocolAbort` after the channel's timeout; a
frame SEAL rejects (tampered, truncated, other parameters) is a `ProtocolAbort` naming it.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from veil.backends.plain import TorchOps
from veil.errors import ConfigError, ProtocolAbort
from veil.he import params as he_params
from veil.he.ckks import Ct, Engine
from veil.he.executor import Z_MAX, HeOps, choose_layout, client_refresh, rotation_steps
from veil.he.layout import Enc, Layout
from veil.model.config import ModelConfig
from veil.model.forward import hidden_states
from veil.model.ops import Step
from veil.tee.channel import Channel
from veil.tee.wire import Message

CLIENT_WEIGHTS = ("embed.weight", "final_norm.weight", "final_norm.bias", "lm_head.weight")
IDLE_S = 3600.0        # how long a server waits for the next request between generations


def client_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: weights[k] for k in CLIENT_WEIGHTS if k in weights}


def server_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if k.startswith("layers.")}


def _blobs(eng: Engine, cts: list[Ct]) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(eng.dumps(c)), dtype=torch.uint8) for c in cts]


def _cts(eng: Engine, msg: Message, what: str) -> list[Ct]:
    out = []
    for t in msg.tensors:
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise ProtocolAbort(f"{what}: expected serialised ciphertexts, got {t.dtype} "
                                f"{tuple(t.shape)}")
        out.append(eng.loads(t.numpy().tobytes(), what))
    return out


def _expect(msg: Message, op: str) -> Message:
    if msg.op != op:
        raise ProtocolAbort(f"expected {op!r} from the peer, got {msg.op!r}")
    return msg


# ---- server -------------------------------------------------------------------------------

class HeServer:
    """Serves encrypted forwards of one model over one channel until the client says bye."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], channel: Channel,
                 mask: bool = True, mask_bound: float = 64.0, gs_tol: float = 1e-3,
                 timeout_s: float = 60.0, z_max: float = Z_MAX) -> None:
        self.cfg, self.weights, self.ch = cfg, server_weights(weights), channel
        self.mask, self.mask_bound, self.gs_tol, self.timeout_s = mask, mask_bound, gs_tol, timeout_s
        self.z_max = z_max
        self.eng: Engine | None = None
        self.ops: HeOps | None = None

    def serve(self) -> None:
        try:
            while True:
                self.ch.set_timeout(IDLE_S)
                try:
                    msg = self.ch.recv()
                except ProtocolAbort:
                    return                                  # the client went away
                self.ch.set_timeout(self.timeout_s)
                if msg.op == "bye":
                    return
                if msg.op == "setup":
                    self._setup(msg)
                elif msg.op == "forward":
                    self._forward(msg)
                else:
                    raise ProtocolAbort(f"server: unknown request {msg.op!r}")
        except Exception as exc:            # report to the client, then stop
            try:
                self.ch.send(Message("error", {"message": f"{type(exc).__name__}: {exc}"}))
            except ProtocolAbort:
                pass
            raise
        finally:
            if self.eng is not None:
                self.eng.close()

    def _setup(self, msg: Message) -> None:
        a = msg.args
        p = he_params.get(str(a.get("params")))
        lay = Layout(int(a["T"]), int(a["C"]), p.slots)
        if len(msg.tensors) != 3:
            raise ProtocolAbort("setup: expected the public, relinearisation and Galois keys")
        blobs = dict(zip(("public", "relin", "galois"),
                         (t.numpy().tobytes() for t in msg.tensors)))
        self.eng = Engine.server(p, blobs, rotation_steps(self.cfg, lay))
        refresh = self._refresh if a.get("refresh", True) is not False else self._no_refresh
        self.ops = HeOps(self.cfg, self.weights, self.eng, lay, refresh,
                         gs_tol=self.gs_tol, mask=self.mask, mask_bound=self.mask_bound,
                         z_max=self.z_max)
        self.ch.send(Message("ready", {"steps": len(self.eng.steps)}))

    def _no_refresh(self, cts: list[Ct], kind: str, n: int, width: int) -> list[Ct]:
        raise ConfigError(f"this forward needs a refresh ({kind}) but the client runs "
                          "non-interactive (refresh='none')")

    def _refresh(self, cts: list[Ct], kind: str, n: int, width: int) -> list[Ct]:
        self.ch.send(Message("refresh", {"kind": kind, "n": n, "width": width},
                             _blobs(self.eng, cts)))
        reply = _expect(self.ch.reply(), "refreshed")
        return _cts(self.eng, reply, "refreshed ciphertext")

    def _forward(self, msg: Message) -> None:
        if self.ops is None:
            raise ProtocolAbort("forward before setup")
        n = msg.args.get("n")
        if not isinstance(n, int) or not 0 < n <= self.ops.lay.T:
            raise ProtocolAbort(f"forward: bad token count {n!r}")
        x = _cts(self.eng, msg, "input ciphertext")
        if len(x) != self.ops.lay.chunks(self.cfg.d_model):
            raise ProtocolAbort(f"forward: {len(x)} ciphertexts for {self.cfg.d_model} features")
        before = {k: (self.eng.counters.count[k], self.eng.counters.seconds[k])
                  for k in list(self.eng.counters.count)}
        t0 = time.perf_counter()
        self.ops.begin(n)
        step = Step(torch.arange(n)[None], None, 0)
        h = hidden_states(self.cfg, self.ops, None, step, None, embeds=Enc(x, self.cfg.d_model))
        out = self.ops.last_position(h)
        total = time.perf_counter() - t0
        cost = self.ops.cost.as_dict()
        cost["seconds"]["other"] = round(max(0.0, total - sum(cost["seconds"].values())), 4)
        cost["total_s"] = round(total, 4)
        prim = {}
        for k in self.eng.counters.count:
            c0, s0 = before.get(k, (0, 0.0))
            prim[k] = {"count": self.eng.counters.count[k] - c0,
                       "s": round(self.eng.counters.seconds[k] - s0, 4)}
        cost["primitives"] = prim
        cost["gs_iterations"] = self.ops.gs_iters
        self.ch.send(Message("result", {"cost": cost}, _blobs(self.eng, out.cts)))


def serve_in_thread(cfg: ModelConfig, weights: dict[str, torch.Tensor], timeout_s: float,
                    **kw: Any) -> tuple[Channel, threading.Thread, list[BaseException]]:
    ours, theirs = socket.socketpair()
    server = HeServer(cfg, weights, Channel(theirs, timeout_s, "client"), timeout_s=timeout_s,
                      **kw)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.serve()
        except BaseException as exc:              # noqa: BLE001 — surfaced by the client
            errors.append(exc)
        finally:
            server.ch.close()

    th = threading.Thread(target=run, name="veil-he-server", daemon=True)
    th.start()
    return Channel(ours, timeout_s, "server"), th, errors


# ---- client -------------------------------------------------------------------------------

@dataclass
class ClientView:
    """What the client decrypted besides its answer: every refreshed value (kind, array)."""

    record: bool = False

    def __post_init__(self) -> None:
        self.refreshed: list[tuple[str, np.ndarray]] = []


class HeClient:
    """The key holder: embeds, encrypts, answers refreshes, decrypts the last hidden state and
    applies the final norm and the LM head."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], channel: Channel,
                 params: str, max_tokens: int | None = None, record: bool = False,
                 refresh: bool = True) -> None:
        self.cfg, self.ch, self.refresh = cfg, channel, refresh
        self.params = he_params.get(params)
        self.lay = choose_layout(cfg, self.params.slots, max_tokens)
        self.eng = Engine.client(self.params, rotation_steps(cfg, self.lay))
        self.torch = TorchOps(cfg, client_weights(weights))
        self.view = ClientView(record)
        self.last_cost: dict = {}
        keys = self.eng.public_blobs()
        self.setup_bytes = sum(len(b) for b in keys.values())
        tensors = [torch.frombuffer(bytearray(keys[k]) or bytearray(1), dtype=torch.uint8)
                   for k in ("public", "relin", "galois")]
        _expect(self.ch.call("setup", tensors, params=self.params.name, T=self.lay.T,
                             C=self.lay.C, refresh=refresh), "ready")

    def _answer(self, msg: Message) -> None:
        if not self.refresh:
            # non-interactive: the client decrypts nothing but its result, whoever asks
            raise ProtocolAbort("the server asked for a refresh in a non-interactive session "
                                "(refresh='none'): refused")
        kind, n, width = msg.args.get("kind"), msg.args.get("n"), msg.args.get("width")
        cts = _cts(self.eng, msg, "ciphertext to refresh")
        vals = [self.eng.decrypt(c) for c in cts]
        if kind == "rms" and (not isinstance(n, int) or not isinstance(width, int)
                              or not 0 < n <= self.lay.T):
            raise ProtocolAbort(f"refresh: bad shape n={n!r} width={width!r}")
        vals = client_refresh(self.cfg, self.lay, vals, kind, n, width)
        if self.view.record:
            self.view.refreshed.append((kind, np.stack(vals)))
        self.ch.send(Message("refreshed", {}, _blobs(self.eng, [self.eng.encrypt(v)
                                                               for v in vals])))

    def hidden(self, ids: list[int]) -> torch.Tensor:
        """The final-normed hidden state (d,) of the last of `ids`, computed under encryption."""
        n = len(ids)
        if not 0 < n <= self.lay.T:
            raise ConfigError(f"he: {n} tokens; this session runs 1–{self.lay.T} "
                              "(the layout's period)")
        x = self.torch.embed(torch.tensor([ids]))[0].double().numpy()
        cts = [self.eng.encrypt(v) for v in self.lay.pack(x)]
        self.ch.send(Message("forward", {"n": n}, _blobs(self.eng, cts)))
        while True:
            msg = self.ch.recv()
            if msg.op == "refresh":
                self._answer(msg)
                continue
            _expect(msg, "result")
            break
        self.ch.stats.round_trips += 1
        self.last_cost = msg.args.get("cost", {})
        out = _cts(self.eng, msg, "result ciphertext")
        h = self.lay.unpack([self.eng.decrypt(c) for c in out], n, self.cfg.d_model)[-1]
        h = torch.tensor(h, dtype=torch.float32)[None, None]
        return self.torch.norm(h, "final_norm")[0, 0]

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Next-token logits (V,) after `ids`."""
        return self.torch.lm_head(self.hidden(ids)[None, None])[0, 0]

    def close(self) -> None:
        try:
            self.ch.send(Message("bye"))
        except ProtocolAbort:
            pass
        self.eng.close()


def max_tokens_for(cfg: ModelConfig, params: str) -> int:
    """The longest sequence a session can take at this parameter set (at least one head's
    features per chunk)."""
    p = he_params.get(params)
    return min(cfg.max_seq_len, 1 << int(math.log2(p.slots // cfg.head_dim)))
