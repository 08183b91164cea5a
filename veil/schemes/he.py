"""`he`: Power-Softmax polynomial LLMs evaluated on CKKS-encrypted input (TenSEAL / SEAL).

    veil.load(power_model, scheme="he", params="n16384", server="process" | "thread", …)

The client (this process) holds the secret key, embeds its tokens, encrypts them, and reads the
logits from the decrypted last hidden state; the server (its own process, or a thread in tests)
holds the model's layers in plaintext and evaluates them on ciphertexts (veil/he/executor.py).
SEAL has no bootstrapping: when a ciphertext runs out of levels the server sends it back to be
re-encrypted — additively masked by default — and an RMS norm is always computed by the client
(it then sees that activation). Each generated token is one encrypted forward over the whole
sequence (no KV cache under encryption). The model must be a Power-Softmax variant with
polynomial activations (`veil train power`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Literal

import torch

from veil.errors import ConfigError, UnsupportedError
from veil.model.config import ModelConfig
from veil.model.generate import GenerationTrace, SamplingConfig, sampler
from veil.model.opening import OpenedModel
from veil.he.support import SUPPORT
from veil.schemes.base import FixedLengthSession, Placement, Scheme, SchemeOptions, Tolerance


@dataclass(frozen=True)
class HeOptions(SchemeOptions):
    params: str = "n16384"        # a 128-bit CKKS set (veil/he/params.py); test-* sets are refused
    server: Literal["process", "thread"] = "process"
    refresh: Literal["client", "none"] = "client"   # none: non-interactive (refused unless the
                                  # whole forward fits the set's levels; the client then decrypts
                                  # only the result)
    mask: bool = True             # mask refreshed values (x + R) before the client sees them
    mask_bound: float = 64.0      # R uniform in ±mask_bound (CKKS headroom limits it)
    gs_tol: float = 1e-3          # Goldschmidt's relative error bound (sets its iterations)
    z_max: float = 2.0            # Goldschmidt reads z/z_max: convergent for z < 2·z_max (a model
                                  # keeps z ≤ 1 on ~99.9% of rows only; peak z in power_quality.md)
    max_tokens: int = 0           # the layout's period (0: the model's context, as the set allows)
    timeout_s: float = 120.0      # a silent peer is gone after this long (ProtocolAbort)
    record_view: bool = False     # keep what the client decrypted at refreshes (client_view)

    def __post_init__(self) -> None:
        from veil.he import params as he_params

        he_params.get(self.params)                      # unknown or below 128 bits: refused
        if self.mask_bound <= 0 or not 0 < self.gs_tol < 1 or self.timeout_s <= 0:
            raise ConfigError("he: mask_bound and timeout_s must be positive, gs_tol in (0, 1)")
        if not self.z_max >= 1:
            raise ConfigError(f"he: option 'z_max' must be ≥ 1, got {self.z_max}")
        if self.max_tokens < 0:
            raise ConfigError(f"he: option 'max_tokens' must be ≥ 0, got {self.max_tokens}")


def _check_non_interactive(cfg: ModelConfig, options: HeOptions, max_tokens: int) -> None:
    """Refuse refresh='none' for a model whose forward needs a refresh at this set (the depth
    plan of the longest forward: refresh points do not depend on the length)."""
    from veil.he import params as he_params
    from veil.he.plan import plan

    pl = plan(cfg, he_params.get(options.params), max_tokens, max_tokens, gs_tol=options.gs_tol,
              z_max=options.z_max)
    if pl.refreshes:
        first = pl.refreshes[0]["why"]
        raise ConfigError(f"he: refresh='none' (non-interactive) needs the whole forward within "
                          f"{options.params}'s {pl.levels} levels; this model needs "
                          f"{len(pl.refreshes)} refreshes, the first before {first} (a larger "
                          "set, fewer layers, or an affine norm)")


def _check_model(cfg: ModelConfig) -> None:
    if cfg.score_bound <= 0:
        raise UnsupportedError("scheme 'he' needs the model's attention score bound "
                               "(score_bound > 0: Goldschmidt's range); make the model with "
                               "`veil train power`")
    if cfg.head_dim & (cfg.head_dim - 1):
        raise UnsupportedError(f"scheme 'he' needs a power-of-two head_dim, got {cfg.head_dim}")


class HeSession(FixedLengthSession):
    """Each new token is one encrypted forward of the whole sequence."""

    def __init__(self, cfg: ModelConfig, opened: OpenedModel, options: HeOptions) -> None:
        super().__init__("he", cfg)
        from veil.he import protocol

        self.options = options
        self.proc: subprocess.Popen | None = None
        self.thread = None
        max_tokens = options.max_tokens or protocol.max_tokens_for(cfg, options.params)
        if options.refresh == "none":
            _check_non_interactive(cfg, options, max_tokens)
        if options.server == "thread":
            channel, self.thread, self.server_errors = protocol.serve_in_thread(
                cfg, opened.weights, options.timeout_s, mask=options.mask,
                mask_bound=options.mask_bound, gs_tol=options.gs_tol, z_max=options.z_max)
        else:
            channel = self._spawn(opened.source, options)
        started = False
        try:
            self.client = protocol.HeClient(cfg, opened.weights, channel, options.params,
                                            max_tokens, record=options.record_view,
                                            refresh=options.refresh == "client")
            started = True
        finally:
            if not started:     # whatever stopped the set-up, the server must not outlive it
                channel.close()
                self._stop_server()
        self._finalizer = weakref.finalize(self, _release, self.client, self.proc, self.thread)

    def _spawn(self, source: str, options: HeOptions):
        from veil.tee.channel import Channel

        ours, theirs = socket.socketpair()
        spec = json.dumps({"fd": theirs.fileno(), "model": source, "timeout_s": options.timeout_s,
                           "mask": options.mask, "mask_bound": options.mask_bound,
                           "gs_tol": options.gs_tol, "z_max": options.z_max})
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "veil.he.server_main", spec],
                                         pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            raise ConfigError(f"he: cannot start the server process ({exc})") from None
        finally:
            theirs.close()
        return Channel(ours, options.timeout_s, "he server")

    def _stop_server(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def logits_last(self, ids: list[int]) -> torch.Tensor:
        """Next-token logits (V,) after `ids`, computed under encryption."""
        if self.closed:
            raise ConfigError("he: the session is closed")
        return self.client.logits([int(i) for i in ids])

    @property
    def last_cost(self) -> dict:
        """The last encrypted forward's cost record (the server's categories and primitives,
        the refreshes, and this channel's bytes)."""
        cost = dict(self.client.last_cost)
        cost["channel"] = self.client.ch.stats.snapshot()
        cost["setup_bytes"] = self.client.setup_bytes
        cost["params"] = self.client.params.name
        cost["secure"] = self.client.params.secure
        return cost

    def client_view(self):
        return self.client.view

    def run_fixed(self, prompt: list[int], s: SamplingConfig) -> tuple[list[int], GenerationTrace]:
        gen = sampler(s)
        ids = list(prompt)
        n = min(s.max_new_tokens, self.client.lay.T - len(prompt))
        if n < 1:
            raise ConfigError(f"he: a {len(prompt)}-token prompt leaves no room in this "
                              f"session's {self.client.lay.T} tokens (option max_tokens)")
        steps = []
        for _ in range(n):
            t0 = time.perf_counter()
            logits = self.logits_last(ids)
            if gen is None:
                tok = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / s.temperature, -1)
                tok = int(torch.multinomial(probs, 1, generator=gen))
            ids.append(tok)
            steps.append(time.perf_counter() - t0)
        return ids[len(prompt):], GenerationTrace(prefill_s=steps[0], decode_s=sum(steps[1:]),
                                                  prompt_tokens=len(prompt),
                                                  decode_steps=len(steps) - 1)

    def _release(self) -> None:
        self._finalizer()


def _release(client, proc, thread) -> None:
    client.close()
    client.ch.close()
    if thread is not None:
        thread.join(10)
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _open(opened: OpenedModel, options: HeOptions) -> HeSession:
    return HeSession(opened.cfg, opened, options)


def _describe(cfg: ModelConfig, options: HeOptions) -> list[str]:
    """The depth plan of the longest forward a session runs (veil/he/plan.py): where the
    server refreshes, and what the client sees each time."""
    from veil.he import params as he_params, protocol
    from veil.he.plan import plan

    _check_model(cfg)
    p = he_params.get(options.params)
    T = options.max_tokens or protocol.max_tokens_for(cfg, options.params)
    pl = plan(cfg, p, T, T, gs_tol=options.gs_tol, z_max=options.z_max)
    s = pl.summary()
    prim = s["primitives"]
    out = [f"{p.name}: N={p.poly_degree}, {p.levels} levels, {p.slots} slots; layout T={pl.layout.T} "
           f"tokens × C={pl.layout.C} features per ciphertext; Goldschmidt {pl.gs_iterations} "
           f"iterations (gs_tol {options.gs_tol}, z_max {options.z_max:g})",
           f"a forward of {T} tokens: {s['refreshes']} refreshes ({s['refresh_ciphertexts']} "
           f"ciphertexts), {prim.get('rotate', 0)} rotations, {prim.get('pt_mul', 0)} plaintext "
           f"and {prim.get('ct_mul', 0) + prim.get('ct_mul_raw', 0)} ciphertext products"]
    for r in pl.refreshes:
        if r["kind"] == "rms":
            sees = "the activation itself (it computes the RMS norm exactly)"
        elif options.mask:
            sees = f"x + R, R uniform in ±{options.mask_bound:g} (statistical hiding)"
        else:
            sees = "the activation itself (mask=false)"
        out.append(f"refresh before {r['why']}: {r['ciphertexts']} ciphertext(s); the client "
                   f"sees {sees}")
    return out


# CKKS noise, Goldschmidt's relative error (gs_tol) and the ct×ct scale relabelling
# (|p − Δ|/Δ ≤ 1e-4 per product): ≤ 5e-2 on the tiny power preset (tests/he)
_CKKS = Tolerance(tiny=5e-2, default=0.5)

HE = Scheme(
    name="he", system="Power-Softmax (AISTATS'26) on CKKS (TenSEAL)", protects="the user's input",
    trusted="the client", sees="CKKS ciphertexts (and the client: refreshed activations)",
    kind="he",
    status="**implemented**: Power-Softmax polynomial models (`veil train power`), encrypted "
           "forward on TenSEAL/SEAL CKKS (128-bit n16384) with masked client-aided refresh in place "
           "of bootstrapping, or non-interactive when the model fits; the small 2-layer model: "
           "26 s per 16-token forward, next token = plaintext's on 100/100 held-out prompts; "
           "softmax alone 9.9× faster than Taylor-exp at 1,024 tokens (paper 9.8×) — see "
           "[docs/he.md](docs/he.md)",
    options=HeOptions, support=SUPPORT,
    tolerance=_CKKS, open=_open, check_model=_check_model, describe=_describe,
    placement=(
        Placement("embedding lookup, final norm, LM head, sampling", "client", "—", "—"),
        Placement("decoder layers (linears, Power-Softmax, polynomial activation, affine/poly "
                  "norm)", "server, on ciphertexts", "the prompt's embeddings under CKKS",
                  "the model's layers (plaintext); the client's public, relinearisation and "
                  "Galois keys", ""),
        Placement("refresh (in place of bootstrapping)", "client, on request",
                  "the re-encrypted values", "—",
                  "the client decrypts intermediate activations: masked x + R (R uniform in "
                  "±mask_bound; statistical, not cryptographic, hiding), or unmasked before an "
                  "RMS norm — enough for layer-by-layer extraction of the model when unmasked; "
                  "none with refresh='none' (non-interactive, for models whose forward fits the "
                  "set's levels)"),
        Placement("shape of the run", "public", "prompt length, one forward per new token", "—",
                  "the sequence length and the number of tokens generated"),
    ))
