"""MERGE (Liang et al., AAAI 2024): the model variant and its conversions.

MERGE makes two-party private generation fast by changing the model, not the protocol:
  * Embedding Resending (ER, `generation="embedding_resend"`): the last hidden state is the next
    input embedding, so the loop has no one-hot embedding, LM head, softmax or argmax; the LM head
    runs once after generation. Training pulls h_t towards E(x_{t+1}) (cosine loss).
  * Merge Module (MM): `attention="constant"` — a learned per-layer table C (heads, L, L) replaces
    softmax(QKᵀ/√d): no q/k projections, and the owner softmaxes C (causal, per query) in
    plaintext, so no softmax runs under MPC; `activation="quad"` (0.125x² + 0.25x + 0.5);
    `norm="affine"` (x·w + b); and `merge()` folds each layer's affine norm into the projections
    that read it, so the merged model has no per-layer norm op at all (exactly equal outputs).
    Students whose norm stays RMS (below) are used unmerged: their norm cannot fold.

How the families map (decided here, documented in docs/merge.md):
  * gpt2 follows the paper: learned positions stay on the input (the resent state gets the same
    position embedding as the token it stands for), LayerNorm → affine, GeLU → quad.
  * llama / qwen2: RoPE has nothing to act on without q/k — position enters through the table
    C[h, pos(query), pos(key)]; the gated MLP keeps its gate, with a quadratic fitted to SiLU in
    place of SiLU (quad(x Wg) ⊙ x Wu: one extra secret product per element, no comparison);
    RMSNorm stays RMSNorm (an affine norm diverges on these models' massive activations; the
    rsqrt under MPC is SpuOps' range-reduced one);
    grouped-query heads keep their grouping (each query head mixes its kv group's values).
  * The residual connections stay, as in the authors' training code (their timed CrypTen model
    drops them to fold Wo·Wup and Wdown·Wv(next) across layers; that fold is not exact for the
    model they train, so veil does not claim it — see docs/merge.md).

Variants compose: only-ER and only-MM (the paper's ablations) are the same knobs set one at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from veil.backends.plain import TorchOps
from veil.errors import ConfigError
from veil.model.config import ModelConfig
from veil.model.forward import forward
from veil.model.weights import Weights, validate
from veil.model.ops import Step

VARIANTS = ("merge", "only-er", "only-mm")
SILU_QUAD = (0.126, 0.5, 0.145)


def variant_config(base: ModelConfig, variant: str = "merge", context: int | None = None
                   ) -> ModelConfig:
    """The student's config: `variant` is merge (ER + MM), only-er or only-mm. `context` is the
    maximum sequence length (the size of the constant-attention tables; MERGE's MSL)."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown MERGE variant {variant!r} (known: {', '.join(VARIANTS)})")
    context = context or base.max_seq_len
    if context > base.max_seq_len:
        raise ConfigError(f"context {context} exceeds the base model's {base.max_seq_len}")
    knobs: dict[str, object] = {"max_seq_len": context, "name": f"{base.name or base.family}-{variant}"}
    if variant in ("merge", "only-er"):
        knobs["generation"] = "embedding_resend"
    if variant in ("merge", "only-mm"):
        # LayerNorm → affine, as the paper; RMSNorm stays: the llama family's massive
        # activations (SmolLM2's residual reaches hundreds by layer 2, 22 000 later) pass an
        # affine norm unscaled, the quadratic squares them, and the student diverges at init
        knobs.update(attention="constant", activation="quad",
                     norm="affine" if base.norm == "layer" else base.norm)
        if base.activation == "silu":
            # MPCFormer's quad stands in for GeLU and is 0.5 at 0; behind a SiLU gate that 0.5
            # passes half of `up` through and the residual stream blows up across layers. The
            # least-squares quadratic of SiLU on [−4, 4] (max error 0.23) starts the student close.
            knobs["quad"] = SILU_QUAD
    return base.with_(**knobs)


@dataclass
class Calibration:
    """Teacher statistics the student starts from: mean attention per layer (heads, L, L), and
    each norm's mean input scale and offset (so an affine norm starts close to the real one)."""

    attention: dict[int, torch.Tensor]
    scale: dict[str, float]
    offset: dict[str, float]


class _Recorder(TorchOps):
    """plain's ops, noting what the student's initialisation needs."""

    def __init__(self, cfg: ModelConfig, weights: Weights, context: int) -> None:
        super().__init__(cfg, weights)
        self.context = context
        self.attn_sum: dict[int, torch.Tensor] = {}
        self.scale_sum: dict[str, float] = {}
        self.offset_sum: dict[str, float] = {}
        self.calls = 0

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.cfg.norm == "layer":
            mean = x.mean(-1, keepdim=True)
            scale = (x - mean).pow(2).mean(-1).add(self.cfg.norm_eps).sqrt()
        else:
            mean = torch.zeros(())
            scale = x.pow(2).mean(-1).add(self.cfg.norm_eps).sqrt()
        self.scale_sum[name] = self.scale_sum.get(name, 0.0) + float(scale.mean())
        self.offset_sum[name] = self.offset_sum.get(name, 0.0) + float(mean.mean())
        return super().norm(x, name)

    def attention(self, layer, q, k, v, step, cache):                     # noqa: ANN001
        cfg, hd = self.cfg, self.cfg.head_dim
        B, T, _ = q.shape
        qh = q.view(B, T, cfg.n_heads, hd).transpose(1, 2)
        kh = k.view(B, T, cfg.n_kv_heads, hd).transpose(1, 2)
        kh = kh.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)
        scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(hd)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1).mean(0)
        acc = self.attn_sum.setdefault(layer, torch.zeros(cfg.n_heads, self.context, self.context))
        acc[:, :T, :T] += probs
        return super().attention(layer, q, k, v, step, cache)


def calibrate(cfg: ModelConfig, weights: Weights, batches: list[torch.Tensor],
              context: int) -> Calibration:
    """Run the teacher over unpadded batches (B, T ≤ context) of token ids."""
    if not batches:
        raise ConfigError("calibration needs at least one batch")
    if any(b.shape[1] > context for b in batches):
        raise ConfigError(f"calibration batches are longer than the context {context}")
    rec = _Recorder(cfg, weights, context)
    with torch.inference_mode():
        for ids in batches:
            B, T = ids.shape
            step = Step(torch.arange(T).expand(B, T), None, 0)
            forward(cfg, rec, ids, step, rec.new_cache(B, T), last_only=True)
    n = len(batches)
    att = {i: a / n for i, a in rec.attn_sum.items()}
    return Calibration(att, {k: v / n for k, v in rec.scale_sum.items()},
                       {k: v / n for k, v in rec.offset_sum.items()})


def student_weights(base_cfg: ModelConfig, base: Weights, cfg: ModelConfig,
                    calib: Calibration | None = None) -> Weights:
    """The MERGE student initialised from the (fine-tuned) base: q/k dropped, the constant table
    set to the log of the teacher's mean attention (uniform causal without calibration), norms
    turned affine with the teacher's mean input scale divided out."""
    out: Weights = {}
    L = cfg.max_seq_len
    for name, t in base.items():
        if cfg.attention == "constant" and (".attn.q." in name or ".attn.k." in name):
            continue
        if name == "pos_embed.weight":
            t = t[:L]
        out[name] = t.detach().clone().float()
    norms = [f"layers.{i}.{n}" for i in range(cfg.n_layers) for n in ("attn_norm", "mlp_norm")]
    norms.append("final_norm")
    if cfg.norm == "affine" and base_cfg.norm != "affine":
        for n in norms:
            w = out[f"{n}.weight"]
            b = out.get(f"{n}.bias", torch.zeros_like(w))
            scale = calib.scale.get(n, 1.0) if calib else 1.0
            offset = calib.offset.get(n, 0.0) if calib else 0.0
            out[f"{n}.weight"] = w / scale
            out[f"{n}.bias"] = b - offset * w / scale
    if cfg.attention == "constant":
        for i in range(cfg.n_layers):
            if calib is not None and i in calib.attention:
                table = torch.log(calib.attention[i][:, :L, :L].clamp(min=1e-6))
            else:
                table = torch.zeros(cfg.n_heads, L, L)
            out[f"layers.{i}.attn.const"] = table.tril()
    validate(out, cfg, "MERGE student")
    return out


def merge(cfg: ModelConfig, weights: Weights) -> tuple[ModelConfig, Weights]:
    """MERGE's merge module on a trained student: each layer's affine norm x·g + b folded into the
    projections reading it (W' = W·diag(g), b' = W·b + b_W), so no norm op is left in the layers.
    Exact: the merged model computes the student's function. (The constant tables are softmaxed
    by the owner when it shares them — mpc/program.py — not stored twice.)"""
    if cfg.attention != "constant" or cfg.norm != "affine":
        raise ConfigError("merge() needs a student with attention='constant' and norm='affine'")
    if cfg.merged:
        raise ConfigError("the model is already merged")
    mcfg = cfg.with_(merged=True)
    out: Weights = {}
    folds = {"attn_norm": ("attn.v",), "mlp_norm": ("mlp.up", "mlp.gate")}
    for name, t in weights.items():
        if ".attn_norm." in name or ".mlp_norm." in name:
            continue
        out[name] = t
    for i in range(cfg.n_layers):
        for norm, targets in folds.items():
            g = weights[f"layers.{i}.{norm}.weight"].double()
            b = weights[f"layers.{i}.{norm}.bias"].double()
            for tgt in targets:
                key = f"layers.{i}.{tgt}"
                if f"{key}.weight" not in weights:
                    continue                                   # gpt2 has no gate
                W = weights[f"{key}.weight"].double()
                bias = weights.get(f"{key}.bias")
                bias = bias.double() if bias is not None else torch.zeros(W.shape[0], dtype=W.dtype)
                out[f"{key}.weight"] = (W * g[None, :]).float()
                out[f"{key}.bias"] = (W @ b + bias).float()
    validate(out, mcfg, "merged MERGE model")
    return mcfg, out
