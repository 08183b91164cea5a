"""Benchmark contenders in a child process: `python -m veil.bench.worker SPEC` (a `WorkerSpec` as
JSON).

MODE `speed`: load veil `plain` and transformers in one process and alternate their repeats, so
machine drift hits both alike. MODE `memory-veil` / `memory-hf`: load one and generate once; the
process's peak RSS is that contender's alone. Prints one JSON line.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch

import veil
from veil.bench.spec import WorkerSpec
from veil.model import zoo


class _Veil:
    def __init__(self, model: str, prompt: str) -> None:
        self.m = veil.load(model)
        self.ids = self.m.encode(prompt) if self.m.tokenizer is not None else [1, 2, 3, 4, 5, 6]

    def first_logits(self) -> list[float]:
        return self.m.logits([self.ids])[0, -1, :64].tolist()

    def run(self, n: int) -> tuple[float, float, list[int]]:
        r = self.m.generate(self.ids, max_new_tokens=n, ignore_eos=True)
        return r.cost.decode_tokens_per_s, r.cost.prefill_s, r.token_ids


class _HF:
    def __init__(self, model: str, prompt: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = zoo.resolve(model)
        if isinstance(folder, str):
            raise SystemExit(f"transformers needs an HF folder, not the preset {folder!r}")
        self.hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        try:
            ids = AutoTokenizer.from_pretrained(str(folder)).encode(prompt)
        except (OSError, ValueError):
            ids = [1, 2, 3, 4, 5, 6]
        self.ids = ids
        self.x = torch.tensor([ids])

    def first_logits(self) -> list[float]:
        with torch.inference_mode():
            return self.hf(self.x).logits[0, -1, :64].tolist()

    def run(self, n: int) -> tuple[float, float, list[int]]:
        # prefill alone (a 1-token generate), then the full run: decode time = total − prefill
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.hf.generate(self.x, max_new_tokens=1, do_sample=False, pad_token_id=0)
            t1 = time.perf_counter()
            out = self.hf.generate(self.x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=0)
            t2 = time.perf_counter()
        return (n - 1) / ((t2 - t1) - (t1 - t0)), t1 - t0, out[0, len(self.ids):].tolist()


def speed(model: str, repeats: int, n: int, prompt: str) -> dict:
    impls = {"veil": _Veil(model, prompt), "hf": _HF(model, prompt)}
    result = {}
    for name, impl in impls.items():
        impl.run(4)  # warm-up
        result[name] = {"prompt_tokens": len(impl.ids), "new_tokens": n, "decode_tokens_per_s": [],
                        "prefill_s": [], "first_logits": impl.first_logits()}
    for _ in range(repeats):
        for name, impl in impls.items():
            tps, prefill, tokens = impl.run(n)
            result[name]["decode_tokens_per_s"].append(tps)
            result[name]["prefill_s"].append(prefill)
            result[name]["tokens"] = tokens
    return result


def memory(impl: str, model: str, n: int, prompt: str) -> dict:
    contender = {"veil": _Veil, "hf": _HF}[impl](model, prompt)
    contender.run(n)
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    spec = WorkerSpec.from_argv(sys.argv[1:])
    if spec.mode == "speed":
        out = speed(spec.model, spec.repeats, spec.new_tokens, spec.prompt)
    elif spec.mode in ("memory-veil", "memory-hf"):
        out = memory(spec.mode.removeprefix("memory-"), spec.model, spec.new_tokens, spec.prompt)
    else:
        raise SystemExit(f"unknown worker mode {spec.mode!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
