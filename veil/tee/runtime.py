"""Assembling a TEE-split model: protect the weights, start the device, hand the enclave its Ops.

The device runs in a thread (tests; same framing and counting over a socketpair) or in its own
OS process (veil/tee/process.py), which holds the masked weights and nothing else.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from veil.backends.recording import RecordingOps
from veil.csprng import SecretRng
from veil.errors import ConfigError, IntegrityError
from veil.model.forward import forward
from veil.model.opening import open_model
from veil.model.ops import Step
from veil.model.config import ModelConfig
from veil.model.weights import Weights, read_safetensors
from safetensors.torch import save_file

from veil.tee.device import DeviceState, View
from veil.tee.process import DeviceHandle, SafetensorsReader
from veil.tee.enclave import EnclaveOps
from veil.tee.mixing import FreshMixings, HeadMixing
from veil.tee.integrity import Freivalds
from veil.tee.pads import PadPool
from veil.tee.schemes.loro import (FactorBank, LoroConfig, LoroProtocol, LoroSecrets, input_groups,
                                   make_factors, masked_matrices, masked_weights)


def enclave_parameters(cfg: ModelConfig, weights: Weights) -> dict[str, torch.Tensor]:
    """Small parameters the enclave keeps in the clear: norm weights and biases."""
    return {k: v for k, v in weights.items() if "norm" in k or k.endswith(".bias")}


def attention_calibration(cfg: ModelConfig, weights: Weights, rng: SecretRng,
                          tokens: int = 32) -> list[dict[str, torch.Tensor]]:
    """True q, k, v rows per layer on random tokens (what `HeadMixing.sample` decorrelates from).
    The tokens come from `rng`: the mixings are chosen against these rows, so a device that knew
    them would learn which transforms were rejected."""
    ids = rng.randint(0, cfg.vocab_size, (2, min(tokens, cfg.max_seq_len)))
    rec = RecordingOps(cfg, weights)
    with torch.inference_mode():
        forward(cfg, rec, ids, Step(torch.arange(ids.shape[1]).expand_as(ids), None, 0),
                rec.new_cache(*ids.shape))
    found = dict(rec.records)
    return [{x: found[f"attn{i}.{x}"] for x in "qkv"} for i in range(cfg.n_layers)]


class TeeModelOps(EnclaveOps):
    """The enclave Ops plus what the harness may ask of the run: the device view and costs."""

    def __init__(self, *args: Any, device: "DeviceHandle", bank: FactorBank | None = None,
                 pool: PadPool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device, self.bank, self.pool = device, bank, pool

    @property
    def device_state(self) -> DeviceState:
        if self.device.state is None:
            raise ConfigError("the device runs in another process; use device_view()")
        return self.device.state

    def device_view(self) -> View:
        if self.device.state is not None:
            return self.device.state.view()
        items: list[tuple[str, torch.Tensor]] = []
        while True:
            msg = self.channel.call("view", offset=len(items))
            items += list(zip(msg.args["names"], msg.tensors))
            if len(items) >= msg.args["total"] or not msg.tensors:
                break
        resident = {n: t for n, t in items if not n.startswith("received/")}
        received = [(n.removeprefix("received/"), t) for n, t in items if n.startswith("received/")]
        return View(resident, received)

    def resident_secret_bytes(self) -> int:
        perms = sum(p.nbytes() for p in self.perms)
        local = sum(t.nbytes for t in self.w.values())
        checks = self.verifier.nbytes() if self.verifier is not None else 0
        return (perms + local + checks + (self.bank.nbytes() if self.bank is not None else 0)
                + self.protocol.nbytes())

    def close(self) -> None:
        """Stop the device (closing the channel first), then wipe the enclave's secrets — even
        when stopping fails."""
        try:
            self.device.stop()
        finally:
            self.wipe()


def protect_loro(cfg: ModelConfig, weights: Weights,
                 lcfg: LoroConfig) -> tuple[LoroSecrets, dict[str, torch.Tensor]]:
    """The offline step (in the TEE, at the owner's): secrets to seal, and the device's weights."""
    rng = SecretRng()
    prior = None
    if lcfg.mask != "random":
        # the public checkpoint the owner fine-tuned from: only its weights are read
        prior = open_model(lcfg.prior).weights
    bank = make_factors(cfg, weights, lcfg, rng, prior)
    device_weights = masked_weights(cfg, weights, bank)
    calib = attention_calibration(cfg, weights, rng)
    perms = [HeadMixing.sample(cfg, lcfg.attention_mixing, calib[i], rng=rng)
             for i in range(cfg.n_layers)]
    return LoroSecrets(bank, enclave_parameters(cfg, weights), perms), device_weights


def fresh_mixings(cfg: ModelConfig, kind: str) -> FreshMixings:
    """Per-conversation head mixings for a scheme that sealed one set (loro, tlg): each set from
    a new key. Uncalibrated: the calibration of `protect_loro` needs true q/k/v rows the online
    enclave does not keep (and ~2 s a draw); no attack in veil/attacks uses the alignment it
    removes."""
    return FreshMixings(lambda: [HeadMixing.sample(cfg, kind, rng=rng)
                                 for rng in [SecretRng()] for _ in range(cfg.n_layers)])


def run_loro(cfg: ModelConfig, secrets_: LoroSecrets, lcfg: LoroConfig, device: DeviceHandle,
             weight_of: Callable[[str], torch.Tensor], verify: bool, fresh: bool = True,
             pad_products: torch.dtype = torch.float32) -> TeeModelOps:
    """The online enclave over a running device; `fresh`: new head mixings per conversation
    (otherwise the sealed ones, for every conversation); `pad_products`: the dtype of the pads'
    products g·W'ᵀ (veil/tee/pads.py)."""
    def stash(names: list[str], start: int, capacity: int, blobs: list[torch.Tensor]) -> None:
        # offline traffic: the pool counts it itself (PadCost.stored_bytes)
        device.channel.call_uncounted("stash", blobs, names=names, start=start, capacity=capacity)

    pool = PadPool(input_groups(cfg), lcfg.pads, weight_of, stash, pad_products)
    biases = {k: v for k, v in secrets_.local.items() if k.endswith(".bias") and "norm" not in k}
    protocol = LoroProtocol(cfg, secrets_.bank, biases, pool, lcfg.pad_ratio)
    verifier = None
    if verify:
        names = masked_matrices(cfg)
        tables = ["embed"] + (["pos_embed"] if cfg.position == "learned" else [])
        # a key of its own: the checks are drawn per run, after the protected secrets were sealed
        verifier = Freivalds({n: weight_of(n) for n in names}, {n: weight_of(n) for n in tables},
                             SecretRng())
    ops = TeeModelOps(cfg, dict(secrets_.local), protocol, secrets_.perms, device.channel, "loro",
                      verifier=verifier, device=device, bank=secrets_.bank, pool=pool)
    if fresh:
        ops.fresh = fresh_mixings(cfg, lcfg.attention_mixing)
    return ops


def start_device(device_weights: dict[str, torch.Tensor] | Path | None, mode: str,
                 record: bool = False, threads: int | None = None, cpus: list[int] | None = None,
                 spin_s: float = 0.0) -> tuple[DeviceHandle, Callable[[str], torch.Tensor]]:
    """Start the untrusted side on `device_weights` (tensors, or a safetensors file such as a
    protected artifact's): mode "thread" (in this process, the same wire protocol) or "process"
    (its own OS process reading the weights from that file, or from a private temp folder);
    threads / cpus / spin_s: the process's torch threads, cores and the channel's busy-poll
    (veil/tee/placement.py); record: keep everything it receives.
    Returns the handle and the enclave's read access to the device's weights by base name."""
    if device_weights is None:
        raise IntegrityError("no device weights: the artifact has none for a split scheme")
    if mode == "thread":
        weights = (device_weights if isinstance(device_weights, dict)
                   else read_safetensors([Path(device_weights)]))
        return DeviceHandle.in_thread(weights, record), lambda n: weights[f"{n}.weight"]
    if not isinstance(device_weights, dict):
        path = Path(device_weights)
        return (DeviceHandle.in_process(path, record, threads=threads, cpus=cpus, spin_s=spin_s),
                SafetensorsReader(path).weight)
    cleanup = Path(tempfile.mkdtemp(prefix="veil-device-"))
    path = cleanup / "model.safetensors"
    written = False
    try:
        save_file(device_weights, str(path))
        reader = SafetensorsReader(path)
        written = True
    finally:
        if not written:     # the masked weights must not stay on disk
            shutil.rmtree(cleanup, ignore_errors=True)
    # from here the handle owns the folder (removed when it stops, even if starting fails)
    return (DeviceHandle.in_process(path, record, cleanup=cleanup, threads=threads, cpus=cpus,
                                    spin_s=spin_s), reader.weight)
