"""Enclave Ops that defer the public model's work to the device: one round trip per flush, not
per op.

When the device holds public weights (KV-Shield: the conversation is the secret, not the model),
nothing stops it from running norms, projections, RoPE, activations and residual adds itself.
These Ops run the one forward (veil/model/forward.py) as every executor does, but an op on device
values returns a `Ref` — a value that stays on the device — and is only recorded in a program.
The program goes out (`program` op, veil/tee/device.py) when the enclave needs a value: the
attention output it must un-transform, the q/k/v rows it must RoPE and transform itself, the
logits. The device keeps values between programs until the enclave drops its `Ref` (freed with
the next program). So a layer costs one round trip when the transform is folded into the device's
weights (the paper's dataflow), two when the enclave transforms q/k/v itself.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.model.config import hf_config_dict
from veil.model.ops import Step
from veil.tee.runtime import TeeModelOps
from veil.tee.wire import Message


class Ref:
    """A value on the device. Dropping the last reference frees it there (with the next program)."""

    __slots__ = ("id", "value", "_owner", "__weakref__")

    def __init__(self, owner: "DeferredOps", id_: int) -> None:
        self.id, self._owner = id_, owner
        self.value: torch.Tensor | None = None     # fetched: the enclave holds a copy

    def __del__(self) -> None:
        self._owner._dead.append(self.id)


Value = torch.Tensor | Ref


class DeferredOps(TeeModelOps):
    """TeeModelOps whose public-model ops run on the device as programs (see the module
    docstring). Subclasses decide how attention is concealed (`attention`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._steps: list[dict[str, Any]] = []
        self._inputs: list[torch.Tensor] = []
        self._labels: list[str] = []
        self._dead: list[int] = []
        self._next = 0
        self._sources: dict[int, list[Ref]] = {}    # a pending step's outputs, to fetch together
        self.channel.call_uncounted("configure", config=hf_config_dict(self.cfg))

    # ---- building programs ------------------------------------------------------------------
    def _in(self, x: Value, label: str) -> int:
        if isinstance(x, Ref):
            return x.id
        self._inputs.append(x.contiguous())
        self._labels.append(label)
        return -len(self._inputs)

    def _emit(self, op: str, ins: list[Value], n_out: int, label: str | list[str] = "",
              **params: Any) -> tuple[Ref, ...]:
        """Record one step; `label` names its tensor inputs in the device's view (one for all,
        or one per input)."""
        labels = label if isinstance(label, list) else [label or op] * len(ins)
        refs = []
        for _ in range(n_out):
            refs.append(Ref(self, self._next))
            self._next += 1
        self._steps.append({"op": op, "in": [self._in(x, lab) for x, lab in zip(ins, labels)],
                            "out": [r.id for r in refs], **params})
        for r in refs:
            self._sources[r.id] = refs
        return tuple(refs)

    def fetch(self, *xs: Value, last: bool = False) -> list[torch.Tensor]:
        """The values of `xs`: one program for all still pending (their siblings — the other
        outputs of the same step — come along). `last`: the forward ends with this program, so
        the device forgets every value it holds once it has answered."""
        want: list[Ref] = []
        for x in xs:
            if isinstance(x, Ref) and x.value is None:
                for r in self._sources.get(x.id, [x]):
                    if r.value is None and r not in want:
                        want.append(r)
        if want or self._steps:
            msg = Message("program", {"steps": self._steps, "outputs": [r.id for r in want],
                                      "free": self._dead, "labels": self._labels,
                                      "clear": last}, self._inputs)
            self._dead = []
            self._steps, self._inputs, self._labels, self._sources = [], [], [], {}
            got = self.channel.call("program", msg.tensors, **msg.args).tensors
            for r, t in zip(want, got):
                r.value = t
        return [x.value if isinstance(x, Ref) else x for x in xs]   # type: ignore[misc]

    # ---- the Ops ------------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> None:
        self._steps, self._inputs, self._labels, self._sources = [], [], [], {}
        self._dead = []                   # the device forgets every value with a new cache
        return super().new_cache(batch, capacity)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.w["embed.weight"])     # ids stay here

    def pos_embed(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(positions, self.w["pos_embed.weight"])

    def norm(self, x: Value, name: str) -> Ref:
        return self._emit("norm", [x], 1, "embeds", name=name)[0]

    def linears(self, x: Value, names: tuple[str, ...]) -> tuple[Ref, ...]:
        return self._emit("linears", [x], len(names), "attn_out", names=list(names))

    def linear(self, x: Value, name: str) -> Ref:
        return self.linears(x, (name,))[0]

    def rope(self, q: Value, k: Value, step: Step) -> tuple[Ref, Ref]:
        q2, k2 = self._emit("rope", [q, k, step.positions], 2, "positions")
        return q2, k2

    def activation(self, x: Value) -> Ref:
        return self._emit("activation", [x], 1)[0]

    def mul(self, a: Value, b: Value) -> Ref:
        return self._emit("mul", [a, b], 1)[0]

    def add(self, a: Value, b: Value) -> Ref:
        # both in the enclave: the embedding rows and the position rows (learned positions)
        label = (["embeds", "pos_embeds"] if not isinstance(a, Ref) and not isinstance(b, Ref)
                 else "attn_out")
        return self._emit("add", [a, b], 1, label)[0]

    def last_position(self, x: Value) -> Ref:
        return self._emit("last_position", [x], 1)[0]

    def lm_head(self, x: Value) -> torch.Tensor:
        name = "embed" if self.cfg.tie_embeddings else "lm_head"
        # nothing of this forward stays on the device once the logits are out
        return self.fetch(self.linear(x, name), last=True)[0]

    def device_attention(self, layer: int, q: Value, k: Value, v: Value, step: Step,
                         head_dim: int, scale: float, label: str) -> torch.Tensor:
        """Attention on the device's cache, fetched: the one place a program must come back."""
        ins = [q, k, v] + ([step.key_valid] if step.key_valid is not None else [])
        (out,) = self._emit("attention", ins, 1, label, layer=layer, start=step.start,
                            n_heads=self.cfg.n_heads, head_dim=head_dim, scale=scale)
        return self.fetch(out)[0]
