"""A small, resumable trainer over canonical weight dicts (the forward is veil's own, run by
`TorchOps` with autograd on).

Checkpoints hold the parameters and AdamW's moments as safetensors plus a JSON state (step, the
run's settings, the loss log) — never pickle. A checkpoint is written to a staging folder and
renamed, so a run stopped at any moment resumes from the last complete one; a checkpoint made with
other settings is refused rather than silently mixed in. Batches are a pure function of
(seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from veil.errors import CheckpointError, ConfigError
from veil.model.weights import Weights

LossFn = Callable[[Weights, torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 200
    batch: int = 8
    seq: int = 64
    lr: float = 8e-5
    weight_decay: float = 0.01
    warmup: int = 10
    clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "seq", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"training: {name} must be a positive integer")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"training: lr must be positive, got {self.lr}")


def batch_at(tokens: np.ndarray, step: int, s: TrainSettings) -> torch.Tensor:
    """The (batch, seq) token windows of one step: random starts drawn from (seed, step)."""
    if len(tokens) <= s.seq:
        raise ConfigError(f"training text has {len(tokens)} tokens, fewer than one window "
                          f"of {s.seq}")
    rng = np.random.default_rng([s.seed, step])
    starts = rng.integers(0, len(tokens) - s.seq, size=s.batch)
    return torch.from_numpy(np.stack([tokens[a:a + s.seq] for a in starts]).astype(np.int64))


def _lr(step: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


class Run:
    """One training run's checkpoint folder."""

    def __init__(self, folder: Path, settings: TrainSettings, tag: dict) -> None:
        self.folder, self.settings = Path(folder), settings
        self.identity = {"settings": asdict(settings), **tag}

    def load(self, params: Weights, opt: torch.optim.AdamW) -> tuple[int, list[dict]]:
        """Restore the last checkpoint into `params`/`opt`; (next step, loss log)."""
        state_path = self.folder / "state.json"
        if not state_path.is_file():
            return 0, []
        try:
            state = json.loads(state_path.read_text())
            tensors = load_file(str(self.folder / "state.safetensors"))
        except (OSError, json.JSONDecodeError, SafetensorError) as exc:
            raise CheckpointError(f"{self.folder}: unreadable training checkpoint ({exc})") from None
        if state.get("identity") != self.identity:
            raise CheckpointError(f"{self.folder}: a checkpoint of a different run (other model or "
                                  "settings); remove it or choose another --out")
        names = sorted(params)
        for i, name in enumerate(names):
            try:
                p, m, v = (tensors[f"{k}.{name}"] for k in ("p", "m", "v"))
            except KeyError:
                raise CheckpointError(f"{self.folder}: checkpoint lacks {name!r}") from None
            if p.shape != params[name].shape:
                raise CheckpointError(f"{self.folder}: {name!r} has shape {tuple(p.shape)}, "
                                      f"expected {tuple(params[name].shape)}")
            with torch.no_grad():
                params[name].copy_(p)
            opt.state[params[name]] = {"step": torch.tensor(float(state["step"])),
                                       "exp_avg": m.to(params[name].device),
                                       "exp_avg_sq": v.to(params[name].device)}
        return int(state["step"]), list(state.get("log", []))

    def save(self, params: Weights, opt: torch.optim.AdamW, step: int, log: list[dict]) -> None:
        tensors = {}
        for name, p in params.items():
            st = opt.state.get(p, {})
            tensors[f"p.{name}"] = p.detach().cpu().contiguous()
            tensors[f"m.{name}"] = st.get("exp_avg", torch.zeros_like(p)).detach().cpu().contiguous()
            tensors[f"v.{name}"] = st.get("exp_avg_sq", torch.zeros_like(p)).detach().cpu().contiguous()
        staging = self.folder.with_name(self.folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file(tensors, str(staging / "state.safetensors"))
        (staging / "state.json").write_text(json.dumps(
            {"identity": self.identity, "step": step, "log": log}, indent=1))
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.replace(staging, self.folder)

    def done(self) -> bool:
        try:
            return json.loads((self.folder / "state.json").read_text())["step"] >= self.settings.steps
        except (OSError, ValueError, KeyError):
            return False


def train(params: Weights, loss_fn: LossFn, tokens: np.ndarray, s: TrainSettings, run: Run,
          desc: str = "train", trainable: Callable[[str], bool] = lambda name: True,
          progress: bool = True, batches: Callable[[int], torch.Tensor] | None = None
          ) -> list[dict]:
    """Optimise `params` in place (AdamW) from the run's last checkpoint to `s.steps`. Each
    step's batch: random windows of `tokens` (`batch_at`), or `batches(step)` when given (a pure
    function of the step, so a resumed run sees the same batches)."""
    from tqdm import tqdm

    names = [n for n in sorted(params) if trainable(n)]
    for n in params:
        params[n].requires_grad_(n in names)
    opt = torch.optim.AdamW([params[n] for n in names], lr=s.lr, weight_decay=s.weight_decay)
    start, log = run.load({n: params[n] for n in names}, opt)
    bar = tqdm(total=s.steps, initial=start, desc=desc, disable=not progress, unit="step")
    gen = torch.Generator()
    for step in range(start, s.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, s)
        gen.manual_seed(s.seed * 1_000_003 + step)
        t0 = time.perf_counter()
        ids = batches(step) if batches is not None else batch_at(tokens, step, s)
        loss, metrics = loss_fn(params, ids, gen)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ConfigError(f"{desc}: loss became {value} at step {step} (lower the lr?)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([params[n] for n in names], s.clip)
        opt.step()
        log.append({"step": step, "loss": value, "s": time.perf_counter() - t0, **metrics})
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}")
        if (step + 1) % s.checkpoint_every == 0 or step + 1 == s.steps:
            run.save({n: params[n] for n in names}, opt, step + 1, log)
    bar.close()
    for n in params:
        params[n].requires_grad_(False)
    return log
