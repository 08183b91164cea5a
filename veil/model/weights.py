"""Checkpoint reading: HF safetensors folders (single or sharded) → veil's canonical tensors.

Canonical names are family-independent, so every backend and scheme addresses weights the same way:
  embed.weight (V, d) · pos_embed.weight (P, d) · final_norm.{weight,bias} · lm_head.weight (V, d)
  layers.{i}.{attn_norm,mlp_norm}.{weight,bias}
  layers.{i}.attn.{q,k,v,o}.{weight,bias}              weights are (out, in), torch's layout
  layers.{i}.mlp.{gate,up,down}.{weight,bias}          gpt2 has no gate
veil never reads pickled checkpoints (`pytorch_model.bin`): unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from veil.errors import CheckpointError
from veil.model.config import ModelConfig

Weights = dict[str, torch.Tensor]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor the config needs, with its shape."""
    d, f = cfg.d_model, cfg.d_ff
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, d)}
    if cfg.position == "learned":
        shapes["pos_embed.weight"] = (cfg.max_seq_len, d)
    norm_params = ("weight",) if cfg.norm in ("rms", "poly") else ("weight", "bias")
    # a merged MERGE model has its per-layer norms folded into the projections (variants/merge.py)
    layer_norms = () if cfg.merged else ("attn_norm", "mlp_norm")
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        for norm in layer_norms:
            for q in norm_params:
                shapes[f"{p}.{norm}.{q}"] = (d,)
        if cfg.attention == "constant":
            # learned logits; the owner softmaxes them (causal, per query) in plaintext
            shapes[f"{p}.attn.const"] = (cfg.n_heads, cfg.max_seq_len, cfg.max_seq_len)
            linears = {"attn.v": (cfg.kv_dim, d, cfg.qkv_bias or cfg.merged),
                       "attn.o": (d, cfg.q_dim, cfg.o_bias)}
        else:
            linears = {"attn.q": (cfg.q_dim, d, cfg.qkv_bias), "attn.k": (cfg.kv_dim, d, cfg.qkv_bias),
                       "attn.v": (cfg.kv_dim, d, cfg.qkv_bias), "attn.o": (d, cfg.q_dim, cfg.o_bias)}
        linears |= {"mlp.up": (f, d, cfg.mlp_bias or cfg.merged),
                    "mlp.down": (d, f, cfg.mlp_bias)}
        if cfg.mlp == "gated":
            linears["mlp.gate"] = (f, d, cfg.mlp_bias or cfg.merged)
        for name, (n_out, n_in, bias) in linears.items():
            shapes[f"{p}.{name}.weight"] = (n_out, n_in)
            if bias:
                shapes[f"{p}.{name}.bias"] = (n_out,)
    for q in norm_params:
        shapes[f"final_norm.{q}"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def _llama_names(cfg: ModelConfig) -> dict[str, str]:
    """HF name → canonical name for llama / qwen2."""
    names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "final_norm.weight",
             "lm_head.weight": "lm_head.weight"}
    for i in range(cfg.n_layers):
        h, p = f"model.layers.{i}", f"layers.{i}"
        names[f"{h}.input_layernorm.weight"] = f"{p}.attn_norm.weight"
        names[f"{h}.post_attention_layernorm.weight"] = f"{p}.mlp_norm.weight"
        for x in "qkvo":
            for q in ("weight", "bias"):
                names[f"{h}.self_attn.{x}_proj.{q}"] = f"{p}.attn.{x}.{q}"
        for x in ("gate", "up", "down"):
            for q in ("weight", "bias"):
                names[f"{h}.mlp.{x}_proj.{q}"] = f"{p}.mlp.{x}.{q}"
    return names


def _gpt2_convert(raw: Weights, cfg: ModelConfig, source: str) -> Weights:
    """gpt2 stores Conv1D weights as (in, out) and fuses q/k/v into `c_attn`."""
    raw = {k.removeprefix("transformer."): v for k, v in raw.items()}
    out: Weights = {}

    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise CheckpointError(f"{source}: missing tensor {name!r}")
        return raw[name]

    out["embed.weight"] = take("wte.weight")
    out["pos_embed.weight"] = take("wpe.weight")
    for i in range(cfg.n_layers):
        h, p = f"h.{i}", f"layers.{i}"
        for src, dst in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            out[f"{p}.{dst}.weight"] = take(f"{h}.{src}.weight")
            out[f"{p}.{dst}.bias"] = take(f"{h}.{src}.bias")
        c_attn_w, c_attn_b = take(f"{h}.attn.c_attn.weight"), take(f"{h}.attn.c_attn.bias")
        d = cfg.d_model
        if c_attn_w.shape != (d, 3 * d) or c_attn_b.shape != (3 * d,):
            raise CheckpointError(f"{source}: tensor '{h}.attn.c_attn.weight' has shape "
                                  f"{tuple(c_attn_w.shape)}, expected {(d, 3 * d)}")
        for j, x in enumerate("qkv"):
            out[f"{p}.attn.{x}.weight"] = c_attn_w[:, j * d:(j + 1) * d].t().contiguous()
            out[f"{p}.attn.{x}.bias"] = c_attn_b[j * d:(j + 1) * d].contiguous()
        for src, dst in (("attn.c_proj", "attn.o"), ("mlp.c_fc", "mlp.up"),
                         ("mlp.c_proj", "mlp.down")):
            out[f"{p}.{dst}.weight"] = take(f"{h}.{src}.weight").t().contiguous()
            out[f"{p}.{dst}.bias"] = take(f"{h}.{src}.bias")
    out["final_norm.weight"] = take("ln_f.weight")
    out["final_norm.bias"] = take("ln_f.bias")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    return out


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed shard index ({exc})") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) named in the index are missing: {missing}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if (folder / "pytorch_model.bin").exists():
        raise CheckpointError(f"{folder}: only a pickled pytorch_model.bin; veil reads safetensors "
                              "only (unpickling a checkpoint can run arbitrary code)")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_safetensors(files: list[Path]) -> Weights:
    """All tensors of the given files as float32; a truncated or corrupt file raises."""
    raw: Weights = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    raw[key] = f.get_tensor(key).to(torch.float32)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    return raw


def load_weights(folder: Path, cfg: ModelConfig) -> Weights:
    """Read and validate the canonical weights of an HF folder."""
    folder = Path(folder)
    raw = read_safetensors(_safetensors_files(folder))
    if cfg.family == "gpt2":
        weights = _gpt2_convert(raw, cfg, str(folder))
    else:
        names = _llama_names(cfg)
        weights = {names[k]: v for k, v in raw.items() if k in names}
    validate(weights, cfg, str(folder))
    return weights


def validate(weights: Weights, cfg: ModelConfig, source: str) -> None:
    """Every expected tensor present with its shape, all finite; raises `CheckpointError`."""
    for name, shape in expected_shapes(cfg).items():
        if name not in weights:
            raise CheckpointError(f"{source}: missing tensor {name!r}")
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape "
                                  f"{tuple(weights[name].shape)}, expected {shape}")
        if not torch.isfinite(weights[name]).all():
            raise CheckpointError(f"{source}: tensor {name!r} holds NaN or infinite values")
