"""Projecting a split run's counts onto hardware with a slow TEE and a fast accelerator.

On this CPU-only machine the enclave and the device are two cores of the same kind, so measured
latencies say little about a real edge box (LoRO's: a Jetson Orin NX GPU beside an OP-TEE secure
world on its Arm cores). The counts do transfer: what the device computes and reads, what the
enclave computes (split into work that overlaps the device and work that does not), the bytes that
cross and the number of crossings. `project` maps them onto a `Hardware` profile:

    device   = max(device FLOPs / accel rate, device weight bytes / accel bandwidth)   (roofline)
    overlap  = enclave work done while the device multiplies / TEE rate   (LoRO's corrections)
               + crypto bytes opened meanwhile / TEE AES rate   (LoRO's sealed pad products,
                 which the device sends ahead of its result)
    serial   = max(enclave model + serial FLOPs / TEE rate, enclave weight bytes / TEE bandwidth)
               + online crypto bytes on the critical path / TEE AES rate   (LoRO's pad keystream)
    link     = crossing bytes / link bandwidth + crossings × world-switch time
    total    = max(device, overlap) + serial + link

as LoRO's public code times its pipeline (max(TEE + transfer, REE) per op), summed over the whole
forward instead of per op — exact when every op has the same TEE/device work ratio, which holds
for LoRO's per-matrix corrections to within the layer shapes. Elementwise ops (norms, activations,
residuals) are left out on both sides: they are < 1% of the FLOPs. Profiles live in
veil/tee/hardware/*.json, each parameter with its source or the assumption behind it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from veil.errors import ConfigError

HARDWARE_DIR = Path(__file__).parent / "hardware"
DEFAULT_HARDWARE = HARDWARE_DIR / "jetson-orin-nx-optee.json"
_NUMBERS = ("accel_gflops", "accel_gbs", "tee_gflops", "tee_gbs", "tee_aes_gbs", "link_gbs",
            "switch_us")


@dataclass(frozen=True)
class Hardware:
    name: str
    accel_gflops: float     # effective fp32 GEMM rate of the untrusted accelerator
    accel_gbs: float        # its effective memory bandwidth (GB/s)
    tee_gflops: float       # effective fp32 rate of code inside the TEE (one core)
    tee_gbs: float          # memory bandwidth the TEE reaches (GB/s)
    tee_aes_gbs: float      # AES-CTR/GCM throughput inside the TEE (GB/s)
    link_gbs: float         # copy bandwidth across the REE/TEE boundary (GB/s)
    switch_us: float        # one crossing and back (world switch / enclave call), microseconds
    sources: dict[str, str]


def load_hardware(path: str | Path) -> Hardware:
    """A profile from JSON: the fields above, each number with a `sources` entry."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable hardware profile ({exc})") from None
    names = {f.name for f in fields(Hardware)}
    if not isinstance(raw, dict) or set(raw) != names:
        raise ConfigError(f"{path}: a hardware profile has exactly the keys {sorted(names)}")
    for k in _NUMBERS:
        if not isinstance(raw[k], (int, float)) or raw[k] <= 0:
            raise ConfigError(f"{path}: {k} must be a positive number, got {raw[k]!r}")
    missing = [k for k in _NUMBERS if k not in raw["sources"]]
    if missing:
        raise ConfigError(f"{path}: no source given for {missing}")
    return Hardware(**raw)


@dataclass(frozen=True)
class SplitCounts:
    """One forward (a prefill, or one decode step) of one scheme, as counted by the run."""

    model_flops: float           # the model's own work (same for every scheme)
    weight_bytes: float          # the model's weights, read once per forward
    device_flops: float          # what the device executed (as it reports it)
    device_weight_bytes: float   # the weights the device holds (read once per forward)
    enclave_overlap_flops: float  # protocol work done while the device computes
    enclave_serial_flops: float  # protocol work on the critical path (masking, head mixing)
    transfer_bytes: float        # bytes across the boundary, both ways, pad material included
    round_trips: float
    enclave_crypto_bytes: float = 0.0  # AES work on the critical path (LoRO's pad keystream)
    enclave_overlap_crypto_bytes: float = 0.0  # AES while the device computes (sealed products)

    @property
    def enclave_model_flops(self) -> float:
        """The model work the device did not do: it ran in the enclave."""
        return max(self.model_flops - self.device_flops, 0.0)

    @property
    def enclave_weight_bytes(self) -> float:
        return max(self.weight_bytes - self.device_weight_bytes, 0.0)

    @property
    def enclave_share(self) -> float:
        """The enclave's share of all FLOPs executed."""
        enclave = self.enclave_model_flops + self.enclave_overlap_flops + self.enclave_serial_flops
        return enclave / (enclave + self.device_flops)

    @staticmethod
    def accelerator_only(model_flops: float, weight_bytes: float) -> "SplitCounts":
        """No protection: the whole model on the accelerator (the REE-only reference)."""
        return SplitCounts(model_flops, weight_bytes, model_flops, weight_bytes, 0, 0, 0, 0)


def project(c: SplitCounts, hw: Hardware) -> dict[str, float]:
    """Seconds per part and in total (see the module docstring)."""
    device = max(c.device_flops / (hw.accel_gflops * 1e9), c.device_weight_bytes / (hw.accel_gbs * 1e9))
    overlap = (c.enclave_overlap_flops / (hw.tee_gflops * 1e9)
               + c.enclave_overlap_crypto_bytes / (hw.tee_aes_gbs * 1e9))
    serial = max((c.enclave_model_flops + c.enclave_serial_flops) / (hw.tee_gflops * 1e9),
                 c.enclave_weight_bytes / (hw.tee_gbs * 1e9)) \
        + c.enclave_crypto_bytes / (hw.tee_aes_gbs * 1e9)
    link = c.transfer_bytes / (hw.link_gbs * 1e9) + c.round_trips * hw.switch_us * 1e-6
    return {"device_s": device, "overlap_s": overlap, "enclave_s": serial, "link_s": link,
            "total_s": max(device, overlap) + serial + link}


def counts_row(c: SplitCounts) -> dict[str, Any]:
    return {f.name: getattr(c, f.name) for f in fields(SplitCounts)}
