"""`ModelConfig`: one frozen description of a decoder-only transformer, read from HF `config.json`.

Families map onto a handful of variant knobs (DESIGN.md principle 2); the forward algorithm reads
only the knobs, never the family name, so a new family is a new `_from_*` reader, not a new forward.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from veil.errors import CheckpointError, ConfigError, UnsupportedError

SUPPORTED_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM",),
    "qwen2": ("Qwen2ForCausalLM",),
    "gpt2": ("GPT2LMHeadModel",),
}

# HF activation names → veil's: the forward only knows these.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: θ plus an optional frequency scaling (HF `rope_type`)."""

    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer. Derived sizes are properties, so presets stay short."""

    family: str  # llama | qwen2 | gpt2 (informational: the knobs below drive the forward)
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq_len: int
    head_dim: int = 0  # 0 → d_model // n_heads
    # rms | layer | affine (MERGE: x·w + b, no statistics) | poly (Power-Softmax: RMS with a
    # polynomial inverse square root, below)
    norm: str = "rms"
    norm_eps: float = 1e-5
    # silu | gelu | gelu_tanh | quad (c₂x² + c₁x + c₀, below) | poly (Σ_k poly[k]·x^k, below)
    activation: str = "silu"
    # quad's (c₂, c₁, c₀): MPCFormer's GeLU stand-in by default (MERGE uses it); variants/merge.py
    # fits SiLU's for the gated families
    quad: tuple[float, float, float] = (0.125, 0.25, 0.5)
    # activation="poly": coefficients c₀, c₁, …, cₙ (low → high degree), a least-squares fit of
    # the base activation on [−act_bound, act_bound] (variants/power.py); polynomials are all a
    # homomorphic-encryption backend can evaluate, and each doubling of the degree costs it a level
    poly: tuple[float, ...] = ()
    act_bound: float = 0.0     # R: the fit's range, which training's range loss keeps inputs in
    # norm="poly": y = x · q(mean(x²)) · w with q(u) = Σ_k norm_poly[k]·u^k fitted to u^(−1/2) on
    # [norm_lo, norm_hi] — an RMS norm without the inverse square root an HE backend cannot take
    norm_poly: tuple[float, ...] = ()
    norm_lo: float = 0.0
    norm_hi: float = 0.0
    mlp: str = "gated"  # gated (SwiGLU: act(x Wg) * x Wu) | plain (act(x Wu))
    position: str = "rope"  # rope | learned
    rope: RopeConfig = field(default_factory=RopeConfig)
    # softmax | constant (MERGE: a learned per-layer (heads, L, L) table replaces softmax(QKᵀ);
    # no q/k projections, no rope) | power (Power-Softmax, arXiv 2410.09457: softmax's exp
    # replaced by an even power, so attention is a polynomial and one division per query row)
    attention: str = "softmax"
    # attention="power", with s_ij = q_i·k_j/√head_dim on the L_i keys query i may see (0 on the
    # others):  a_ij = s_ij^p / (L_i·ε + Σ_j s_ij^p)  (length-agnostic: ε is compared with the
    # row's *mean* power, so short and long rows are normalised alike)  or  s_ij^p / (ε + Σ_j
    # s_ij^p)  (not length-agnostic). backends/plain.py computes it with the row scaled by
    # max_j |s_ij| + δ (the same function, no overflow).
    power_p: int = 4                  # the even power p ≥ 2
    power_eps: float = 1.0            # ε > 0: keeps the division away from 0 for flat rows
    power_length_agnostic: bool = True
    power_delta: float = 1e-3         # δ > 0 of the stable form (an all-zero row stays finite)
    # B: the public bound on |s_ij| that training's range loss enforces (0 = none). An HE backend
    # needs it > 0: it sizes the division's range [ε/(ε + B^p), 1] and so its depth.
    score_bound: float = 0.0
    # standard | embedding_resend (MERGE: the last hidden state is the next input embedding;
    # the LM head runs once, after generation)
    generation: str = "standard"
    # MERGE's merge module applied: the per-layer affine norms are folded into the projections that
    # read them, and the constant attention is stored softmaxed (`attn.probs`); see variants/merge.py
    merged: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.d_model // max(self.n_heads, 1))
        for knob, value in (("d_model", self.d_model), ("n_layers", self.n_layers),
                            ("n_heads", self.n_heads), ("n_kv_heads", self.n_kv_heads),
                            ("vocab_size", self.vocab_size), ("d_ff", self.d_ff),
                            ("max_seq_len", self.max_seq_len)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config: {knob} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model config: n_heads={self.n_heads} is not a multiple of "
                              f"n_kv_heads={self.n_kv_heads}")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"model config: RoPE needs an even head_dim, got {self.head_dim}")
        for knob, value, allowed in (("norm", self.norm, ("rms", "layer", "affine", "poly")),
                                     ("activation", self.activation,
                                      ("silu", "gelu", "gelu_tanh", "quad", "poly")),
                                     ("mlp", self.mlp, ("gated", "plain")),
                                     ("position", self.position, ("rope", "learned")),
                                     ("attention", self.attention,
                                      ("softmax", "constant", "power")),
                                     ("generation", self.generation,
                                      ("standard", "embedding_resend"))):
            if value not in allowed:
                raise UnsupportedError(f"model config: {knob}={value!r} is not supported "
                                       f"(supported: {', '.join(allowed)})")
        if self.merged and (self.attention != "constant" or self.norm != "affine"):
            raise ConfigError("model config: merged=True needs attention='constant' and "
                              "norm='affine' (only those fold exactly into the projections)")
        self._check_polynomial_knobs()

    def _check_polynomial_knobs(self) -> None:
        """The Power-Softmax knobs (checked whatever the variant: a bad value is bad anywhere).
        Coefficient lists are stored as float tuples, so a config read from JSON compares equal
        to the one written."""
        for knob in ("poly", "norm_poly"):
            try:
                coeffs = tuple(float(c) for c in getattr(self, knob))
            except (TypeError, ValueError):
                raise ConfigError(f"model config: {knob} must be a sequence of numbers, got "
                                  f"{getattr(self, knob)!r}") from None
            if not all(math.isfinite(c) for c in coeffs):
                raise ConfigError(f"model config: {knob} holds a non-finite coefficient")
            object.__setattr__(self, knob, coeffs)
        p = self.power_p
        if isinstance(p, bool) or not isinstance(p, int) or p < 2 or p % 2:
            raise ConfigError(f"model config: power_p must be an even integer ≥ 2 (an odd power "
                              f"gives negative attention weights), got {p!r}")
        for knob in ("power_eps", "power_delta"):
            value = getattr(self, knob)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"model config: {knob} must be a positive number, got {value!r}")
        for knob in ("score_bound", "act_bound", "norm_lo", "norm_hi"):
            value = getattr(self, knob)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"model config: {knob} must be a number ≥ 0, got {value!r}")
        if not isinstance(self.power_length_agnostic, bool):
            raise ConfigError(f"model config: power_length_agnostic must be true or false, got "
                              f"{self.power_length_agnostic!r}")
        if self.activation == "poly" and not self.poly:
            raise ConfigError("model config: activation='poly' needs the coefficients `poly` "
                              "(c0, c1, …, low → high degree)")
        if self.norm == "poly":
            if not self.norm_poly:
                raise ConfigError("model config: norm='poly' needs the coefficients `norm_poly` "
                                  "of its inverse square root")
            if not 0 < self.norm_lo < self.norm_hi:
                raise ConfigError(f"model config: norm='poly' needs 0 < norm_lo < norm_hi (the "
                                  f"range its inverse square root was fitted on), got "
                                  f"norm_lo={self.norm_lo}, norm_hi={self.norm_hi}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def n_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, L = self.d_model, self.n_layers
        if self.attention == "constant":   # v, o and the (heads, L, L) table; no q/k
            attn = d * self.kv_dim + self.q_dim * d + self.n_heads * self.max_seq_len ** 2
            attn += self.kv_dim * self.qkv_bias + d * self.o_bias
        else:
            attn = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d
            attn += (self.q_dim + 2 * self.kv_dim) * self.qkv_bias + d * self.o_bias
        n_mlp_in = 2 if self.mlp == "gated" else 1
        mlp = (n_mlp_in + 1) * d * self.d_ff + (n_mlp_in * self.d_ff + d) * self.mlp_bias
        norm = d * (1 if self.norm in ("rms", "poly") else 2)
        layer_norms = 0 if self.merged else 2 * norm
        total = L * (attn + mlp + layer_norms) + norm + self.vocab_size * d
        if not self.tie_embeddings:
            total += self.vocab_size * d
        if self.position == "learned":
            total += self.max_seq_len * d
        return total

    def with_(self, **changes: Any) -> "ModelConfig":
        return replace(self, **changes)


def _need(cfg: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in cfg and cfg[key] is not None:
            return cfg[key]
    raise ConfigError(f"config.json: missing field {keys[0]!r}")


def _eos(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise UnsupportedError(f"config.json: activation {name!r} is not supported "
                               f"(supported: {', '.join(sorted(_ACTIVATIONS))})")
    return _ACTIVATIONS[name]


def _rope(cfg: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes `rope_parameters`; older files carry `rope_theta` + `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedError(f"config.json: rope_type {kind!r} is not supported "
                               "(supported: default, linear, llama3)")
    return RopeConfig(
        theta=theta, kind=kind, factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_positions=int(params.get("original_max_position_embeddings", 8192)))


def _from_llama_like(cfg: dict[str, Any], family: str) -> ModelConfig:
    n_heads = int(_need(cfg, "num_attention_heads"))
    d = int(_need(cfg, "hidden_size"))
    if family == "qwen2" and cfg.get("use_sliding_window"):
        raise UnsupportedError("config.json: qwen2 with use_sliding_window=true is not supported")
    bias = bool(cfg.get("attention_bias", family == "qwen2"))
    return ModelConfig(
        family=family,
        vocab_size=int(_need(cfg, "vocab_size")),
        d_model=d,
        n_layers=int(_need(cfg, "num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or d // n_heads),
        d_ff=int(_need(cfg, "intermediate_size")),
        max_seq_len=int(_need(cfg, "max_position_embeddings")),
        norm="rms", norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        activation=_activation(cfg.get("hidden_act", "silu")), mlp="gated",
        position="rope", rope=_rope(cfg),
        qkv_bias=bias, o_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=_eos(cfg),
        pad_token_id=cfg.get("pad_token_id"), name=str(cfg.get("_name_or_path", "")),
    )


def _from_gpt2(cfg: dict[str, Any]) -> ModelConfig:
    d = int(_need(cfg, "n_embd", "hidden_size"))
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("scale_attn_weights") is False:
        raise UnsupportedError("config.json: gpt2 attention-scaling variants are not supported")
    return ModelConfig(
        family="gpt2",
        vocab_size=int(_need(cfg, "vocab_size")),
        d_model=d,
        n_layers=int(_need(cfg, "n_layer", "num_hidden_layers")),
        n_heads=int(_need(cfg, "n_head", "num_attention_heads")),
        n_kv_heads=int(_need(cfg, "n_head", "num_attention_heads")),
        d_ff=int(cfg.get("n_inner") or 4 * d),
        max_seq_len=int(_need(cfg, "n_positions", "max_position_embeddings")),
        norm="layer", norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        activation=_activation(cfg.get("activation_function", "gelu_new")), mlp="plain",
        position="learned", qkv_bias=True, o_bias=True, mlp_bias=True,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=_eos(cfg),
        pad_token_id=cfg.get("pad_token_id"), name=str(cfg.get("_name_or_path", "")),
    )


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Build a `ModelConfig` from the dict of an HF `config.json`."""
    family = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if family not in SUPPORTED_ARCHITECTURES:
        named = family or (archs[0] if archs else "none given")
        supported = ", ".join(f"{f} ({'/'.join(a)})" for f, a in SUPPORTED_ARCHITECTURES.items())
        raise UnsupportedError(f"unsupported architecture {named!r}; supported: {supported}")
    if family == "gpt2":
        return _from_gpt2(cfg)
    return _from_llama_like(cfg, family)


def load_config(folder: Path) -> ModelConfig:
    """Read `folder/config.json`, raising `CheckpointError`/`ConfigError` with the file named."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config_from_hf(data)


def rope_inv_freq(cfg: ModelConfig) -> list[float]:
    """Per-pair inverse frequencies, with the configured scaling (matches HF's rope init)."""
    r, hd = cfg.rope, cfg.head_dim
    inv = [1.0 / (r.theta ** (2 * i / hd)) for i in range(hd // 2)]
    if r.kind == "linear":
        return [f / r.factor for f in inv]
    if r.kind == "llama3":
        low_wavelen = r.original_max_positions / r.low_freq_factor
        high_wavelen = r.original_max_positions / r.high_freq_factor
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen > low_wavelen:
                out.append(f / r.factor)
            elif wavelen < high_wavelen:
                out.append(f)
            else:
                smooth = (r.original_max_positions / wavelen - r.low_freq_factor) / (
                    r.high_freq_factor - r.low_freq_factor)
                out.append((1 - smooth) * f / r.factor + smooth * f)
        return out
    return inv


# Tiny presets: random weights, seconds to build, used by the tests of every backend.
PRESETS: dict[str, ModelConfig] = {
    "tiny-llama": ModelConfig(family="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                              n_kv_heads=2, d_ff=128, max_seq_len=128, norm_eps=1e-5,
                              rope=RopeConfig(theta=10000.0), tie_embeddings=True,
                              bos_token_id=1, eos_token_ids=(2,), name="tiny-llama"),
    "tiny-qwen2": ModelConfig(family="qwen2", vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                              n_kv_heads=1, d_ff=160, max_seq_len=128, norm_eps=1e-6,
                              rope=RopeConfig(theta=1e6), qkv_bias=True, tie_embeddings=False,
                              bos_token_id=1, eos_token_ids=(2,), name="tiny-qwen2"),
    "tiny-gpt2": ModelConfig(family="gpt2", vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                             n_kv_heads=4, d_ff=256, max_seq_len=128, norm="layer",
                             activation="gelu_tanh", mlp="plain", position="learned",
                             qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True,
                             bos_token_id=0, eos_token_ids=(0,), name="tiny-gpt2"),
    # Power-Softmax (variants/power.py): every op a polynomial or one division per attention row,
    # what the HE backend runs. The activation is GeLU's least-squares quadratic on ±4 (GeLU's
    # odd part is exactly x/2, so the cubic fit is this quadratic); B=2, p=4, ε=4 keeps the
    # division's Goldschmidt range [ε/(ε+B^p), 1] = [0.2, 1] (5 iterations to 1e-3).
    "tiny-power": ModelConfig(family="llama", vocab_size=256, d_model=32, n_layers=2, n_heads=2,
                              n_kv_heads=2, d_ff=64, max_seq_len=32, norm="affine",
                              activation="poly", poly=(0.256445, 0.5, 0.127685), act_bound=4.0,
                              mlp="plain", position="rope", attention="power", power_p=4,
                              power_eps=4.0, score_bound=2.0, tie_embeddings=True,
                              bos_token_id=1, eos_token_ids=(2,), name="tiny-power"),
}


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` for a `ModelConfig` (used to materialise presets as HF folders)."""
    if cfg.family == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
                "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len,
                "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
                "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
                "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None}
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.family]
    out = {"model_type": cfg.family, "architectures": [arch], "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
           "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
           "hidden_act": "silu", "rope_theta": cfg.rope.theta,
           "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
           "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None}
    if cfg.family == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    return out
