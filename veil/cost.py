"""Cost records: what a generation cost, with named fields, and analytic FLOP counts that every
scheme shares. The CLI prints them (`Cost.summary`) and the benches write them (`Cost.row`), both
from the same fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from veil.model.config import ModelConfig


def forward_flops(cfg: ModelConfig, new_tokens: int, context: int,
                  head_tokens: int | None = None) -> int:
    """FLOPs (2 per multiply-add) of a forward over `new_tokens` tokens attending to at most
    `context` keys, with the LM head applied to `head_tokens` of them (default: all)."""
    d, L = cfg.d_model, cfg.n_layers
    n_in = 2 if cfg.mlp == "gated" else 1
    projections = 2 * d * (cfg.q_dim + 2 * cfg.kv_dim) + 2 * cfg.q_dim * d
    per_token = L * (projections + 2 * (n_in + 1) * d * cfg.d_ff + 4 * cfg.q_dim * context)
    head = 2 * d * cfg.vocab_size * (new_tokens if head_tokens is None else head_tokens)
    return new_tokens * per_token + head


def generation_flops(cfg: ModelConfig, prompt_tokens: int, new_tokens: int) -> int:
    """A generation's model FLOPs: the prompt's forward (LM head on its last position only), then
    one forward per further token."""
    flops = forward_flops(cfg, prompt_tokens, prompt_tokens, head_tokens=1)
    return flops + sum(forward_flops(cfg, 1, prompt_tokens + i + 1)
                       for i in range(max(new_tokens - 1, 0)))


@dataclass(frozen=True)
class SplitCost:
    """A split run's counters (TEE: the enclave and the untrusted device). A runtime reports
    running totals; `since` turns two readings into one generation's share."""

    bytes_sent: int = 0              # enclave → device, online (sealed pad products included)
    bytes_received: int = 0          # device → enclave, online
    round_trips: int = 0
    enclave_flops: int = 0           # the protocol's own work in the enclave
    enclave_overlap_flops: int = 0   # … of which done while the device computes
    enclave_wait_s: float = 0.0      # the enclave blocked on the device
    enclave_crypto_bytes: int = 0    # AES work on the critical path (the pads' keystream)
    enclave_overlap_crypto_bytes: int = 0  # AES while the device computes (sealed products opened)
    device_flops: int = 0            # as the device reports them
    device_busy_s: float = 0.0       # the device's compute time, as it reports it
    device_weight_bytes: int = 0     # level: the weights resident on the device
    device_store_bytes: int = 0      # level: opaque sealed stores resident on the device
    offline_flops: int = 0           # pad precomputation, outside prefill/decode time
    offline_s: float = 0.0
    offline_bytes: int = 0           # sealed pad products put on the device (offline traffic)
    pad_bytes_used: int = 0          # sealed pad products fetched back online
    mixing_draws: int = 0            # fresh attention transforms drawn (one set per new cache)
    mixing_draw_s: float = 0.0       # enclave CPU time drawing them (offline: one conversation ahead)
    setup_bytes: int = 0             # per-conversation set-up traffic (kvshield's folded weights)

    LEVELS: ClassVar[tuple[str, ...]] = ("device_weight_bytes", "device_store_bytes")

    def since(self, before: "SplitCost") -> "SplitCost":
        """What happened between `before` and this reading (levels are kept as they are now)."""
        return SplitCost(**{f.name: getattr(self, f.name) if f.name in self.LEVELS
                            else getattr(self, f.name) - getattr(before, f.name)
                            for f in fields(self)})

    @property
    def moved_bytes(self) -> int:
        return self.bytes_sent + self.bytes_received


@dataclass(frozen=True)
class Cost:
    """What one generation cost. `split` is set by schemes with an untrusted device."""

    scheme: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    flops: int
    split: SplitCost | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")

    def row(self) -> dict[str, Any]:
        """Flat fields for a benchmark's JSON row (split counters prefixed `split_`)."""
        out = {k: v for k, v in asdict(self).items() if k != "split"}
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        if self.split is not None:
            out.update({f"split_{k}": v for k, v in asdict(self.split).items()})
        return out

    def summary(self) -> str:
        line = (f"[{self.scheme}] prompt {self.prompt_tokens} tok, prefill {self.prefill_s:.2f} s · "
                f"{self.new_tokens} new tok, decode {self.decode_tokens_per_s:.1f} tok/s · "
                f"{self.flops / 1e9:.2f} GFLOP")
        s = self.split
        if s is not None:
            tokens = max(self.prompt_tokens + self.new_tokens, 1)
            line += (f" · channel {s.moved_bytes / tokens / 1024:.1f} KiB/tok, "
                     f"{s.round_trips / tokens:.0f} round trips/tok"
                     f" · enclave {s.enclave_flops / 1e6:.1f} MFLOP"
                     f" · device busy {s.device_busy_s:.2f} s, enclave waited "
                     f"{s.enclave_wait_s:.2f} s")
        return line
