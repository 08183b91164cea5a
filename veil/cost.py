"""Cost records: what a generation cost, and analytic FLOP counts that every scheme shares."""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class Cost:
    """What one generation cost. Protected schemes extend this with bytes, rounds, per-side work."""

    scheme: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    flops: int
    # split schemes: counters over this generation (whole batch) — bytes_sent, bytes_received,
    # round_trips, enclave_flops, device_flops (as the device reports them), device_busy_s (the
    # device's compute time, as it reports it), enclave_wait_s (the enclave blocked on the device),
    # offline_flops, offline_s (pad precomputation, outside prefill/decode time)
    split: dict[str, float] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")

    def summary(self) -> str:
        line = (f"[{self.scheme}] prompt {self.prompt_tokens} tok, prefill {self.prefill_s:.2f} s · "
                f"{self.new_tokens} new tok, decode {self.decode_tokens_per_s:.1f} tok/s · "
                f"{self.flops / 1e9:.2f} GFLOP")
        if self.split:
            tokens = max(self.prompt_tokens + self.new_tokens, 1)
            moved = self.split.get("bytes_sent", 0) + self.split.get("bytes_received", 0)
            line += (f" · channel {moved / tokens / 1024:.1f} KiB/tok, "
                     f"{self.split.get('round_trips', 0) / tokens:.0f} round trips/tok")
            if "enclave_flops" in self.split:
                line += f" · enclave {self.split['enclave_flops'] / 1e6:.1f} MFLOP"
            if "device_busy_s" in self.split:
                line += (f" · device busy {self.split['device_busy_s']:.2f} s, enclave waited "
                         f"{self.split.get('enclave_wait_s', 0):.2f} s")
        return line
