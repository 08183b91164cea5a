"""Device-view audit: how much of the true weights and activations the untrusted side can see.

For every tensor in a device `View` (resident and received): its absolute cosine with its own true
counterpart (the same weight; the same call site's activations over the run), and the largest with
any true weight / activation of the same shape, next to the chance floor (how much distinct true
tensors of one shape resemble each other). A masked tensor scores near 0 against its counterpart;
a tensor shipped in the clear scores 1. The audit is direct (no
attacker model): a permutation or scaling can score low here and still fall to the prior-matching
attacks in veil/attacks — the audit is a floor on leakage, not a proof of security.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

import veil
from veil.backends.recording import RecordingOps
from veil.model.generate import SamplingConfig, generate_ids
from veil.model.weights import Weights


@dataclass
class AuditRow:
    name: str
    shape: tuple[int, ...]
    cos_matched: float       # |cos| with its own true counterpart (same weight / same call site)
    cos_weight: float        # max |cos| with any true weight matrix of the same shape
    cos_activation: float    # max |cos| with any true activation of the same shape


@dataclass
class AuditReport:
    rows: list[AuditRow] = field(default_factory=list)
    # How much distinct true tensors of one shape resemble each other by themselves: a device
    # tensor scoring no higher than this against *other* tensors shows nothing beyond chance.
    floor_weight: float = 0.0
    floor_activation: float = 0.0

    @property
    def max_cos_matched(self) -> float:
        return max((r.cos_matched for r in self.rows), default=0.0)

    @property
    def max_cos_weight(self) -> float:
        return max((r.cos_weight for r in self.rows), default=0.0)

    @property
    def max_cos_activation(self) -> float:
        return max((r.cos_activation for r in self.rows), default=0.0)

    def worst(self, n: int = 5) -> list[AuditRow]:
        return sorted(self.rows, key=lambda r: -max(r.cos_matched, r.cos_weight, r.cos_activation))[:n]


def counterpart(device_name: str) -> str:
    """The true tensor a device tensor stands for: weights by name, activations by call site."""
    m = re.fullmatch(r"linear:\['([^']+)'.*\]:0", device_name)
    if m:
        name = m.group(1)
        return "in:lm_head" if name in ("embed", "lm_head") else f"in:{name}"
    m = re.fullmatch(r"attention:(\d+):([012])", device_name)
    if m:
        return f"attn{m.group(1)}.{'qkv'[int(m.group(2))]}"
    m = re.fullmatch(r"kv_cache\.([kv])\[(\d+)\]", device_name)
    if m:
        return f"attn{m.group(2)}.{m.group(1)}"
    return device_name


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


def _floor(tensors: list[torch.Tensor]) -> float:
    by_shape: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        by_shape[tuple(t.shape)].append(t)
    floor = 0.0
    for group in by_shape.values():
        if len(group) > 1:
            a = torch.nn.functional.normalize(torch.stack([t.reshape(-1).double() for t in group]), dim=1)
            sims = (a @ a.t()).abs()
            sims.fill_diagonal_(0.0)
            # identical tensors (q/k/v share their input) are one tensor, not a resemblance
            distinct = sims[sims < 1 - 1e-9]
            if distinct.numel():
                floor = max(floor, float(distinct.max()))
    return floor


def audit(view_tensors: list[tuple[str, torch.Tensor]], weights: Weights,
          activations: dict[str, torch.Tensor]) -> AuditReport:
    """Audit named device tensors against true weights and (stacked) true activations by tag."""
    items = [(n, t.float().reshape(-1, t.shape[-1])) for n, t in _split_caches(view_tensors)
             if t.is_floating_point() and t.numel() > 1]
    mats = {k: w for k, w in weights.items() if w.dim() == 2}
    truth = {**mats, **activations}
    by_shape_w: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for w in mats.values():
        by_shape_w[tuple(w.shape)].append(w)
    by_shape_a: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for t in activations.values():
        by_shape_a[tuple(t.shape)].append(t)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (_, t) in enumerate(items):
        groups[tuple(t.shape)].append(i)
    rows: dict[int, AuditRow] = {}
    for shape, idx in groups.items():
        ts = [items[i][1] for i in idx]
        cw = _max_abs_cos(ts, by_shape_w.get(shape, []))
        ca = _max_abs_cos(ts, by_shape_a.get(shape, []))
        for j, i in enumerate(idx):
            ref = truth.get(counterpart(items[i][0]))
            matched = (_max_abs_cos([ts[j]], [ref])[0]
                       if ref is not None and tuple(ref.shape) == shape else float("nan"))
            rows[i] = AuditRow(items[i][0], shape, matched, cw[j], ca[j])
    return AuditReport([rows[i] for i in range(len(items))], _floor(list(mats.values())),
                       _floor(list(activations.values())))


def audit_run(model: str, scheme: str, prompt: list[int], max_new_tokens: int = 8,
              **options) -> AuditReport:
    """Generate under `scheme` with the device view recorded, replay the same generation in plain
    with every activation kept, and audit the view against both."""
    with veil.load(model, scheme=scheme, record_view=True, **options) as protected, \
            veil.load(model) as plain:
        recorder = RecordingOps(plain.cfg, plain.ops.w)
        generate_ids(plain.cfg, recorder, [prompt], SamplingConfig(max_new_tokens=max_new_tokens))
        protected.generate(prompt, max_new_tokens=max_new_tokens)
        view = protected.device_view()
        return audit(list(view.resident.items()) + stack_by_tag(view.received), plain.ops.w,
                     dict(stack_by_tag(recorder.records)))
