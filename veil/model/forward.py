"""The one forward algorithm. It reads the model's variant knobs and calls `Ops`; it never touches
torch, jax or ciphertexts itself, so every backend executes exactly this code.

Decoder block (pre-norm, as in llama/qwen2/gpt2):
    h = x + Wo · attention(rope(Wq·norm(x)), rope(Wk·norm(x)), Wv·norm(x))
    y = h + Wdown · mlp(norm(h))      mlp(z) = act(Wgate z) ⊙ (Wup z)  |  act(Wup z)

MERGE (`attention="constant"`): attention(·) mixes the values with a learned per-layer table —
no q/k projections and no rope; with `merged`, the (affine) norms are already folded into Wv and
Wup/Wgate, so the block calls no norm at all.

`embeds` lets a caller feed input embeddings instead of token ids (MERGE's embedding resending:
the previous step's last hidden state is the next input).
"""

from __future__ import annotations

from typing import Any

from veil.model.config import ModelConfig
from veil.model.ops import Ops, Step


def block(cfg: ModelConfig, ops: Ops, i: int, x: Any, step: Step, cache: Any) -> Any:
    """One decoder layer on x: (B, T, d) → (B, T, d)."""
    p = f"layers.{i}"
    h = x if cfg.merged else ops.norm(x, f"{p}.attn_norm")
    if cfg.attention == "constant":
        q = k = None
        v = ops.linear(h, f"{p}.attn.v")                                  # (B, T, nkv*hd)
    else:
        # q: (B, T, nh*hd); k, v: (B, T, nkv*hd)
        q, k, v = ops.linears(h, (f"{p}.attn.q", f"{p}.attn.k", f"{p}.attn.v"))
        if cfg.position == "rope":
            q, k = ops.rope(q, k, step)
    a = ops.attention(i, q, k, v, step, cache)                            # (B, T, nh*hd)
    x = ops.add(x, ops.linear(a, f"{p}.attn.o"))                          # (B, T, d)

    h = x if cfg.merged else ops.norm(x, f"{p}.mlp_norm")
    if cfg.mlp == "gated":
        gate, up = ops.linears(h, (f"{p}.mlp.gate", f"{p}.mlp.up"))       # (B, T, d_ff) each
        m = ops.mul(ops.activation(gate), up)
    else:
        m = ops.activation(ops.linear(h, f"{p}.mlp.up"))                  # (B, T, d_ff)
    return ops.add(x, ops.linear(m, f"{p}.mlp.down"))                     # (B, T, d)


def hidden_states(cfg: ModelConfig, ops: Ops, ids: Any, step: Step, cache: Any,
                  embeds: Any = None) -> Any:
    """Final normed hidden states (B, T, d) of the new tokens `ids` (B, T), or of the input
    embeddings `embeds` (B, T, d) when given (then `ids` is ignored)."""
    x = ops.embed(ids) if embeds is None else embeds                      # (B, T, d)
    if cfg.position == "learned":
        x = ops.add(x, ops.pos_embed(step.positions))
    for i in range(cfg.n_layers):
        x = block(cfg, ops, i, x, step, cache)
    return ops.norm(x, "final_norm")


def forward(cfg: ModelConfig, ops: Ops, ids: Any, step: Step, cache: Any,
            last_only: bool = False, embeds: Any = None) -> Any:
    """Logits (B, T, V) of the new tokens, or (B, 1, V) for the last position only."""
    x = hidden_states(cfg, ops, ids, step, cache, embeds)
    if last_only:
        x = ops.last_position(x)
    return ops.lm_head(x)
