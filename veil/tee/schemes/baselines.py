"""The TEE-shielded schemes LoRO is measured against, on the same split runtime.

Each hides a weight matrix W (out×in) by one family of transforms, all written as
    W' = diag(s) · W[π_out][:, π_in] + Δ           (device holds W')
with the enclave sending x̃ = x[:, π_in] and recovering  y = ((ỹ − x̃Δᵀ) / s)[:, π_out⁻¹] + b.
  tlg        TransLinkGuard (MM'24): secret permutations π_in, π_out; s = 1, Δ = 0. Attention on
             the device under head-block permutations.
  soter      SOTER (ATC'22): one secret scalar μ per matrix (s = μ); the input crosses in the clear.
             A share of matrices (`enclave_share`, default 0.2) stays in the enclave, as SOTER
             keeps part of the model inside.
  nnsplitter NNSplitter (ICML'23): Δ on the `mask_fraction` (default 1%) largest-magnitude weights,
             noise of the weights' own scale; the input crosses in the clear.
  shadownet  ShadowNet (S&P'23): per-output-channel scales and permutations of both sides.
In all but tlg, attention (and its KV cache) and every nonlinear op run in the enclave.
These are faithful to what each scheme shows the device, not to every engineering detail of the
original systems; veil/attacks measure what that view gives away against a public prior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from veil.backends.plain import TorchOps
from veil.csprng import SecretRng
from veil.errors import ConfigError
from veil.model.config import ModelConfig
from veil.model.weights import Weights
from veil.tee.mixing import HeadMixing, seal_mixings, unseal_mixings
from veil.tee.pads import PadCost
from veil.tee.process import DeviceHandle
from veil.tee.runtime import TeeModelOps, fresh_mixings
from veil.tee.schemes.loro import input_groups

BASELINES = ("tlg", "soter", "nnsplitter", "shadownet")


@dataclass
class Obfuscation:
    """The secret transform of one matrix (see the module docstring)."""

    out_dim: int
    perm_in: torch.Tensor | None
    perm_out: torch.Tensor | None
    scale: torch.Tensor | float
    delta_idx: torch.Tensor | None = None   # (k, 2) rows, cols of Δ's non-zeros (device layout)
    delta_val: torch.Tensor | None = None

    def nbytes(self) -> int:
        ts = [self.perm_in, self.perm_out, self.delta_idx, self.delta_val,
              self.scale if isinstance(self.scale, torch.Tensor) else None]
        return sum(t.nbytes for t in ts if t is not None) + 8

    def wipe(self) -> None:
        for t in (self.perm_in, self.perm_out, self.delta_idx, self.delta_val):
            if t is not None:
                t.zero_()
        if isinstance(self.scale, torch.Tensor):
            self.scale.zero_()
        else:
            self.scale = 0.0

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        out = w
        if self.perm_out is not None:
            out = out[self.perm_out]
        if self.perm_in is not None:
            out = out[:, self.perm_in]
        s = self.scale
        out = out * (s[:, None] if isinstance(s, torch.Tensor) else s)
        if self.delta_idx is not None:
            out = out.clone()
            out[self.delta_idx[:, 0], self.delta_idx[:, 1]] += self.delta_val
        return out.contiguous()

    def inv_out(self) -> torch.Tensor | None:
        return None if self.perm_out is None else torch.argsort(self.perm_out)


def _obfuscation(scheme: str, w: torch.Tensor, rng: SecretRng, mask_fraction: float) -> Obfuscation:
    out_dim, in_dim = w.shape
    if scheme == "tlg":
        return Obfuscation(out_dim, rng.perm(in_dim), rng.perm(out_dim), 1.0)
    if scheme == "soter":
        mu = float(rng.uniform((), 0.5, 2.0, dtype=torch.float64)) * rng.sign()
        return Obfuscation(out_dim, None, None, mu)
    if scheme == "nnsplitter":
        k = max(1, int(mask_fraction * w.numel()))
        flat = w.abs().reshape(-1).topk(k).indices
        idx = torch.stack([flat // in_dim, flat % in_dim], dim=1)
        val = w.reshape(-1)[flat].abs().mean() * rng.randn(k) * 4
        return Obfuscation(out_dim, None, None, 1.0, idx, val)
    if scheme == "shadownet":
        scale = rng.uniform(out_dim, 0.5, 2.0)
        return Obfuscation(out_dim, rng.perm(in_dim), rng.perm(out_dim), scale)
    raise ConfigError(f"unknown baseline {scheme!r}")


class BaselineProtocol:
    """The enclave's side: conceal = permute the input; reveal = remove Δ, divide, un-permute."""

    def __init__(self, obf: dict[str, Obfuscation], biases: dict[str, torch.Tensor],
                 groups: dict[str, tuple[str, ...]]) -> None:
        self.obf, self.biases = obf, biases
        self.group_of = {n: g for g, names in groups.items() for n in names}
        self.enclave_flops = 0
        self.overlap_flops = 0      # all of it: Δ's share is computed while the device multiplies

    def conceal(self, group: str, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        # one input for the whole group: members share π_in (see protect_baseline)
        p = self.obf[group].perm_in
        return (x[:, p] if p is not None else x), None

    def precompute(self, name: str, x: torch.Tensor, ctx: Any,
                   fetched: torch.Tensor | None = None) -> Any:
        o = self.obf[name]
        if o.delta_idx is None:
            return None
        x_dev = x[:, o.perm_in] if o.perm_in is not None else x
        # x̃Δᵀ over Δ's non-zeros only: O(N·k)
        contrib = x_dev[:, o.delta_idx[:, 1]] * o.delta_val                   # (N, k)
        self.enclave_flops += 2 * x.shape[0] * len(o.delta_val)
        self.overlap_flops += 2 * x.shape[0] * len(o.delta_val)
        return torch.zeros(x.shape[0], o.out_dim).index_add_(1, o.delta_idx[:, 0], contrib)

    def request_args(self, ctx: Any) -> dict:
        return {}

    def prepare(self, rows: int) -> None:
        """Nothing to make offline: the transforms are fixed."""

    def pad_cost(self) -> PadCost | None:
        return None

    def nbytes(self) -> int:
        return sum(o.nbytes() for o in self.obf.values())

    def wipe(self) -> None:
        for o in self.obf.values():
            o.wipe()

    def reveal(self, name: str, y_dev: torch.Tensor, pre: Any, ctx: Any = None) -> torch.Tensor:
        o = self.obf[name]
        y = y_dev - pre if pre is not None else y_dev
        y = y / (o.scale if not isinstance(o.scale, torch.Tensor) else o.scale)
        inv = o.inv_out()
        if inv is not None:
            y = y[:, inv]
        b = self.biases.get(f"{name}.bias")
        return y + b if b is not None else y

    def table_rows(self, name: str, ids: torch.Tensor, rows_dev: torch.Tensor) -> torch.Tensor:
        raise AssertionError("baselines keep tables in the enclave")


def protect_baseline(scheme: str, cfg: ModelConfig, weights: Weights, share: float,
                     mask_fraction: float, rng: SecretRng):
    """(device weights, per-matrix obfuscations, names computed in the enclave), every secret
    drawn from `rng`. share: the share of the layers' input groups computed in the enclave;
    mask_fraction: nnsplitter's share of noised weights."""
    if scheme not in BASELINES:
        raise ConfigError(f"unknown baseline {scheme!r}")
    # the LM head and embedding tables stay in the enclave; a share of the layers' input groups too
    groups = {g: m for g, m in input_groups(cfg).items() if g.startswith("layers.")}
    keys = list(groups)
    n_local = int(round(share * len(keys)))
    local = {n for i in rng.perm(len(keys))[:n_local].tolist() for n in groups[keys[i]]}
    obf: dict[str, Obfuscation] = {}
    device: dict[str, torch.Tensor] = {}
    for g, members in groups.items():
        shared_in = None
        for n in members:
            if n in local:
                continue
            o = _obfuscation(scheme, weights[f"{n}.weight"], rng, mask_fraction)
            if shared_in is None:
                shared_in = o.perm_in
            o.perm_in = shared_in       # one input permutation per input group
            obf[n] = o
            device[f"{n}.weight"] = o.apply(weights[f"{n}.weight"])
    return device, obf, local


class BaselineOps(TeeModelOps):
    """Enclave Ops of a baseline: device linears for obfuscated matrices; tables, the LM head,
    the enclave's share of matrices and (except tlg) attention computed locally."""

    def __init__(self, cfg: ModelConfig, local: dict[str, torch.Tensor], protocol: BaselineProtocol,
                 perms: list, channel, scheme: str, local_names: set[str], attention_on_device: bool,
                 device: DeviceHandle) -> None:
        super().__init__(cfg, local, protocol, perms, channel, scheme, device=device)
        self.local_names, self.attention_on_device = local_names, attention_on_device
        if not attention_on_device:     # the enclave's own attention runs every variant plain does
            self.support = {**TorchOps.support, "generation": frozenset({"standard"})}

    def new_cache(self, batch: int, capacity: int):
        if self.attention_on_device:
            return super().new_cache(batch, capacity)
        return TorchOps.new_cache(self, batch, capacity)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return TorchOps.embed(self, ids)

    def pos_embed(self, positions: torch.Tensor) -> torch.Tensor:
        return TorchOps.pos_embed(self, positions)

    def linears(self, x: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        if names[0] in self.local_names:
            return tuple(TorchOps.linear(self, x, n) for n in names)
        return super().linears(x, names)

    def attention(self, layer, q, k, v, step, cache):
        if self.attention_on_device:
            return super().attention(layer, q, k, v, step, cache)
        return TorchOps.attention(self, layer, q, k, v, step, cache)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return TorchOps.lm_head(self, x)


@dataclass
class BaselineSecrets:
    """What a baseline's enclave keeps (what `veil protect` seals): its in-the-clear parameters
    (norms, biases, tables, LM head, the matrices it computes itself), each device matrix's
    transform, and tlg's attention permutations."""

    scheme: str
    enclave: dict[str, torch.Tensor]
    obf: dict[str, Obfuscation]
    local_names: set[str]
    perms: list  # list[HeadMixing]

    _FIELDS = ("perm_in", "perm_out", "scale", "delta_idx", "delta_val")

    def wipe(self, weights: bool = False) -> None:
        """Zero the drawn transforms; with `weights`, the enclave's parameters too (when they are
        its own copy, unsealed from an artifact)."""
        for o in self.obf.values():
            o.wipe()
        for p in self.perms:
            p.wipe()
        for t in self.enclave.values() if weights else ():
            t.zero_()

    def to_sealable(self) -> tuple[dict[str, torch.Tensor], dict]:
        t: dict[str, torch.Tensor] = {f"enclave.{k}": v for k, v in self.enclave.items()}
        obf_meta = {}
        for n, o in self.obf.items():
            obf_meta[n] = {"out_dim": o.out_dim}
            for f in self._FIELDS:
                v = getattr(o, f)
                if isinstance(v, torch.Tensor):
                    t[f"obf.{f}.{n}"] = v
                elif v is not None:
                    obf_meta[n][f] = float(v)
        t.update(seal_mixings(self.perms))
        return t, {"scheme": self.scheme, "obf": obf_meta, "local_names": sorted(self.local_names),
                   "layers": len(self.perms)}

    @staticmethod
    def from_sealed(t: dict[str, torch.Tensor], meta: dict) -> "BaselineSecrets":
        obf = {}
        for n, m in meta["obf"].items():
            fields = {f: t.get(f"obf.{f}.{n}", m.get(f)) for f in BaselineSecrets._FIELDS}
            obf[n] = Obfuscation(int(m["out_dim"]), fields["perm_in"], fields["perm_out"],
                                 fields["scale"] if fields["scale"] is not None else 1.0,
                                 fields["delta_idx"], fields["delta_val"])
        perms = unseal_mixings(t, int(meta["layers"]))
        enclave = {k.removeprefix("enclave."): v for k, v in t.items() if k.startswith("enclave.")}
        return BaselineSecrets(meta["scheme"], enclave, obf, set(meta["local_names"]), perms)


def protect_baseline_secrets(scheme: str, cfg: ModelConfig, weights: Weights, share: float,
                             mask_fraction: float
                             ) -> tuple[BaselineSecrets, dict[str, torch.Tensor]]:
    """The offline step: the enclave's secrets and the device's weights (one `SecretRng`, fresh
    key, for all of them)."""
    rng = SecretRng()
    device_weights, obf, local_names = protect_baseline(scheme, cfg, weights, share,
                                                        mask_fraction, rng)
    keep = {"embed.weight", "pos_embed.weight", "lm_head.weight"}
    # the enclave keeps norms, biases, the tables, the LM head, its share of the linears and
    # (constant attention) the attention tables: everything but the device's obfuscated matrices
    enclave = {k: v for k, v in weights.items()
               if "norm" in k or k.endswith((".bias", ".attn.const")) or k in keep
               or k.rsplit(".", 1)[0] in local_names}
    perms = ([HeadMixing.sample(cfg, "permute", rng=rng) for _ in range(cfg.n_layers)] if scheme == "tlg"
             else [])
    return BaselineSecrets(scheme, enclave, obf, local_names, perms), device_weights


def run_baseline(cfg: ModelConfig, secrets_: BaselineSecrets, device: DeviceHandle,
                 fresh: bool = False) -> BaselineOps:
    """The online enclave of a baseline over a running device; `fresh` (tlg): new head mixings
    per conversation instead of the sealed ones."""
    biases = {k: v for k, v in secrets_.enclave.items() if k.endswith(".bias") and "norm" not in k}
    protocol = BaselineProtocol(secrets_.obf, biases, input_groups(cfg))
    ops = BaselineOps(cfg, dict(secrets_.enclave), protocol, secrets_.perms, device.channel,
                      secrets_.scheme, secrets_.local_names, secrets_.scheme == "tlg", device)
    if fresh and ops.attention_on_device:
        ops.fresh = fresh_mixings(cfg, "permute")
    return ops
