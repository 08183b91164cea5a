"""The private-generation step as one pure jax function: what SPU compiles and the parties run.

    step(params, onehot, k, v, start, positions[, key_valid]) → (next_onehot, token, logits, k', v')

`params` (the owner's weights, by canonical name), `onehot` (the client's tokens, or the previous
step's secret argmax) and the caches are secret under MPC; `start`, `positions` and `key_valid` are
public (where the step sits, which slots are padding). The step runs the one forward
(veil/model/forward.py) through `JaxOps`, takes the last position's logits and the greedy token —
argmax and one-hot stay inside the function, so the next step's input never leaves MPC: vanilla
private generation as MERGE's baseline describes it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from veil.backends.plain import constant_probs
from veil.model.config import ModelConfig
from veil.model.forward import forward, hidden_states
from veil.model.generate import step_window
from veil.model.weights import Weights, expected_shapes
from veil.mpc.jax_ops import JaxCache, JaxOps
from veil.model.ops import Step, check_support


def params_of(cfg: ModelConfig, weights: Weights) -> dict[str, np.ndarray]:
    """The owner's weights as float32 numpy arrays (the MPC input of party 0). A constant-attention
    table is softmaxed here, by the owner in plaintext (`attn.const` → `attn.probs`): MERGE's
    point is that no softmax runs under MPC."""
    out = {}
    for k, v in weights.items():
        if k.endswith(".attn.const"):
            k, v = k.replace(".const", ".probs"), constant_probs(v.detach().double())
        out[k] = np.ascontiguousarray(v.detach().float().numpy())
    return out


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shapes of `params_of`'s output, from the public config alone (what every party
    compiles against)."""
    return {k.replace(".attn.const", ".attn.probs"): v for k, v in expected_shapes(cfg).items()}


def one_hot(ids: Any, vocab: int) -> np.ndarray:
    """(B, T) token ids → (B, T, V) float32 one-hot (the client's input)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros((*ids.shape, vocab), dtype=np.float32)
    np.put_along_axis(out, ids[..., None], 1.0, axis=-1)
    return out


def make_step(cfg: ModelConfig, ops_cls: type[JaxOps] = JaxOps, argmax: bool = True,
              head_softmax: bool = False) -> Callable[..., tuple]:
    """The step function for `cfg` (see the module docstring); `ops_cls` picks the executor's
    hooks (plain jax, or SPU-friendly forms). Without `argmax` the step ends at the logits
    (params, onehot, k, v, start, positions) → (logits, k', v'): the client receives them,
    picks the token and inputs its one-hot itself (`MpcConfig.reveal == "logits"`).
    `head_softmax`: the argmax is taken of the softmax over the vocabulary, as the MERGE paper's
    vanilla baseline computes it (same token, the softmax's cost added)."""
    check_support(ops_cls.support, cfg, f"backend {ops_cls.name!r}")

    def step(params: dict[str, Any], onehot: Any, k: list[Any], v: list[Any], start: Any,
             positions: Any, key_valid: Any = None) -> tuple:
        ops = ops_cls(cfg, params)
        cache = JaxCache(list(k), list(v))
        logits = forward(cfg, ops, onehot, Step(positions, key_valid, start), cache,
                         last_only=True)[:, -1]                                  # (B, V)
        if not argmax:
            return logits, cache.k, cache.v
        scores = logits
        if head_softmax:
            scores = ops.softmax(logits, jnp.ones(logits.shape, dtype=bool))
        token = jnp.argmax(scores, axis=-1)                                      # (B,)
        nxt = (jnp.arange(cfg.vocab_size)[None, :] == token[:, None]).astype(onehot.dtype)
        return nxt[:, None, :], token.astype(jnp.int32), logits, cache.k, cache.v
    return step


def make_resend_step(cfg: ModelConfig, first: bool, ops_cls: type[JaxOps] = JaxOps
                     ) -> Callable[..., tuple]:
    """MERGE's loop step: (params, x, k, v, start, positions) → (h, k', v'), h (B, 1, d) the last
    hidden state — both the state kept for the LM head and the next step's input. The first step
    takes the prompt's one-hot rows (real embeddings), later ones the previous h."""
    check_support(ops_cls.support, cfg, f"backend {ops_cls.name!r}")

    def step(params: dict[str, Any], x: Any, k: list[Any], v: list[Any], start: Any,
             positions: Any) -> tuple:
        ops = ops_cls(cfg, params)
        cache = JaxCache(list(k), list(v))
        h = hidden_states(cfg, ops, x if first else None, Step(positions, None, start), cache,
                          embeds=None if first else x)[:, -1:]
        return h, cache.k, cache.v
    return step


def make_head(cfg: ModelConfig, ops_cls: type[JaxOps] = JaxOps, argmax: bool = True
              ) -> Callable[..., tuple]:
    """The LM head once over the kept states (B, n, d) → (tokens (B, n) int32, logits), or
    without `argmax` just (logits,) — the paper's ending: the client decodes the tokens."""
    def head(params: dict[str, Any], states: Any) -> tuple:
        logits = ops_cls(cfg, params).lm_head(states)
        if not argmax:
            return (logits,)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits
    return head


def generate_plaintext(cfg: ModelConfig, weights: Weights, prompt: list[int], max_new_tokens: int,
                       capacity: int | None = None) -> tuple[list[int], list[np.ndarray]]:
    """Greedy generation through the jitted step in plaintext jax (the reference the MPC runs
    are checked against, and a check of `JaxOps` itself): (token ids, logits per step). It steps
    through the same windows as every other loop (`step_window`)."""
    capacity = capacity or len(prompt) + max_new_tokens
    params = params_of(cfg, weights)
    cache = JaxCache.zeros(cfg, 1, capacity)
    k, v = cache.k, cache.v
    x = one_hot([prompt], cfg.vocab_size)

    def window(i: int) -> tuple[np.int32, np.ndarray]:
        start, t_new = step_window(len(prompt), i)
        return np.int32(start), np.arange(start, start + t_new)[None]

    if cfg.generation == "embedding_resend":
        first, later = jax.jit(make_resend_step(cfg, True)), jax.jit(make_resend_step(cfg, False))
        states = []
        for i in range(max_new_tokens):
            x, k, v = (first if i == 0 else later)(params, x, k, v, *window(i))
            states.append(x)
        tokens, logits = jax.jit(make_head(cfg))(params, jnp.concatenate(states, axis=1))
        return [int(t) for t in np.asarray(tokens)[0]], list(np.asarray(logits)[0][:, None])
    step = jax.jit(make_step(cfg))
    tokens, logits_seen = [], []
    for i in range(max_new_tokens):
        x, token, logits, k, v = step(params, x, k, v, *window(i))
        tokens.append(int(token[0]))
        logits_seen.append(np.asarray(logits))
    return tokens, logits_seen
