"""Device-view audit: how much of the true weights and activations the untrusted side can see.

For every tensor in a device `View` (resident and received), the largest absolute cosine with any
true weight matrix and with any true activation of the same run that has the same shape. A
masked tensor scores near 0; a tensor shipped in the clear scores 1. The audit is direct (no
attacker model): a permutation or scaling can score low here and still fall to the prior-matching
attacks in veil/attacks — the audit is a floor on leakage, not a proof of security.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from veil.backends.plain import TorchOps
from veil.model.config import ModelConfig
from veil.model.weights import Weights
from veil.ops import Step


class RecordingOps(TorchOps):
    """Plain execution that keeps every activation the forward produces at an op boundary."""

    def __init__(self, cfg: ModelConfig, weights: Weights) -> None:
        super().__init__(cfg, weights)
        self.records: list[tuple[str, torch.Tensor]] = []

    def _keep(self, tag: str, x: torch.Tensor) -> torch.Tensor:
        self.records.append((tag, x.detach().reshape(-1, x.shape[-1]).clone()))
        return x

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._keep("embed", super().embed(ids))

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        self._keep(f"in:{name}", x)
        return self._keep(f"out:{name}", super().linear(x, name))

    def attention(self, layer: int, q, k, v, step: Step, cache) -> torch.Tensor:
        for tag, t in (("q", q), ("k", k), ("v", v)):
            self._keep(f"attn{layer}.{tag}", t)
        return self._keep(f"attn{layer}.out", super().attention(layer, q, k, v, step, cache))

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        self._keep("in:lm_head", x)
        return self._keep("logits", super().lm_head(x))


@dataclass
class AuditRow:
    name: str
    shape: tuple[int, ...]
    cos_weight: float        # max |cos| with a true weight matrix of the same shape
    cos_activation: float    # max |cos| with a true activation of the same shape


@dataclass
class AuditReport:
    rows: list[AuditRow] = field(default_factory=list)

    @property
    def max_cos_weight(self) -> float:
        return max((r.cos_weight for r in self.rows), default=0.0)

    @property
    def max_cos_activation(self) -> float:
        return max((r.cos_activation for r in self.rows), default=0.0)

    def worst(self, n: int = 5) -> list[AuditRow]:
        return sorted(self.rows, key=lambda r: -max(r.cos_weight, r.cos_activation))[:n]


def _max_abs_cos(items: list[torch.Tensor], refs: list[torch.Tensor]) -> list[float]:
    """For each item, the largest |cos| with any ref (all flattened, all one shape)."""
    if not refs:
        return [0.0] * len(items)
    a = torch.nn.functional.normalize(torch.stack([t.reshape(-1).double() for t in items]), dim=1)
    out = torch.zeros(len(items), dtype=torch.float64)
    for start in range(0, len(refs), 512):
        b = torch.nn.functional.normalize(
            torch.stack([t.reshape(-1).double() for t in refs[start:start + 512]]), dim=1)
        out = torch.maximum(out, (a @ b.t()).abs().max(dim=1).values)
    return out.tolist()


def _split_caches(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """A resident KV cache (L, B, H, S, hd) is audited per layer, as rows of features."""
    out = []
    for name, t in named:
        if name.startswith("kv_cache.") and t.dim() == 5:
            for layer in range(t.shape[0]):
                rows = t[layer].permute(0, 2, 1, 3).reshape(-1, t.shape[2] * t.shape[4])
                out.append((f"{name}[{layer}]", rows[rows.abs().sum(-1) > 0]))
        else:
            out.append((name, t))
    return out


def stack_by_tag(tagged: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Concatenate, per tag (one call site: op, layer, argument), the rows of every call in a run.

    A single decode row of 64–576 features has a chance |cos| of 0.1–0.3 with *some* unrelated
    vector among thousands; the whole run's rows of one call site, compared with the same site's
    true rows, measure the leak without that noise floor."""
    rows: dict[str, list[torch.Tensor]] = defaultdict(list)
    for tag, t in tagged:
        if t.is_floating_point() and t.dim() >= 2:
            rows[tag].append(t.float().reshape(-1, t.shape[-1]))
    return [(tag, torch.cat(parts)) for tag, parts in rows.items()]


def audit(view_tensors: list[tuple[str, torch.Tensor]], weights: Weights,
          activations: list[torch.Tensor]) -> AuditReport:
    """Audit named device tensors against true weights and (stacked) true activations."""
    items = [(n, t.float().reshape(-1, t.shape[-1])) for n, t in _split_caches(view_tensors)
             if t.is_floating_point() and t.numel() > 1]
    by_shape_w: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for w in weights.values():
        if w.dim() == 2:
            by_shape_w[tuple(w.shape)].append(w)
    by_shape_a: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for a in activations:
        by_shape_a[tuple(a.shape)].append(a)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (_, t) in enumerate(items):
        groups[tuple(t.shape)].append(i)
    report = AuditReport()
    rows: dict[int, AuditRow] = {}
    for shape, idx in groups.items():
        ts = [items[i][1] for i in idx]
        cw = _max_abs_cos(ts, by_shape_w.get(shape, []))
        ca = _max_abs_cos(ts, by_shape_a.get(shape, []))
        for j, i in enumerate(idx):
            rows[i] = AuditRow(items[i][0], shape, cw[j], ca[j])
    report.rows = [rows[i] for i in range(len(items))]
    return report


def audit_run(model: str, scheme: str, prompt: list[int], max_new_tokens: int = 8,
              **options) -> AuditReport:
    """Generate under `scheme` with the device view recorded, replay the same generation in plain
    with every activation kept, and audit the view against both."""
    import veil
    from veil.api import Model

    protected = veil.load(model, scheme=scheme, record_view=True, **options)
    plain = veil.load(model)
    recorder = RecordingOps(plain.cfg, plain.ops.w)
    Model(plain.cfg, recorder, "plain", None, "audit").generate(prompt, max_new_tokens=max_new_tokens)
    protected.generate(prompt, max_new_tokens=max_new_tokens)
    view = protected.device_view()
    return audit(list(view.resident.items()) + stack_by_tag(view.received), plain.ops.w,
                 [t for _, t in stack_by_tag(recorder.records)])
