"""Model-core details: sharded checkpoints, RoPE scaling, the support table, config parsing."""

from __future__ import annotations

import pytest
import torch

import veil
from conftest import make_hf_model, max_abs
from veil.backends.plain import TorchOps
from veil.errors import ConfigError, UnsupportedError
from veil.model.config import PRESETS, config_from_hf
from veil.model.ops import check_support


def test_sharded_checkpoint_loads_identically(tmp_path):
    hf = make_hf_model("tiny-qwen2")
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = [[5, 6, 7, 8, 9]]
    assert max_abs(veil.load(tmp_path / "one").logits(ids),
                   veil.load(tmp_path / "sharded").logits(ids)) == 0.0


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    import transformers

    from veil.model.config import hf_config_dict

    d = hf_config_dict(PRESETS["tiny-llama"])
    d.pop("model_type")
    d["rope_scaling"] = {**scaling, "rope_theta": 10000.0}
    cfg = transformers.LlamaConfig(**d)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    m = veil.load(tmp_path)
    assert m.cfg.rope.kind == scaling["rope_type"]
    ids = [list(range(3, 90))]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits
    assert max_abs(m.logits(ids), ref) <= 1e-4


def test_backend_refuses_unsupported_variant():
    cfg = PRESETS["tiny-llama"]

    no_rope = {**TorchOps.support, "position": frozenset({"learned"})}
    with pytest.raises(UnsupportedError, match="no-rope.*position='rope'"):
        check_support(no_rope, cfg, "backend 'no-rope'")
    check_support(TorchOps.support, cfg, "backend 'plain'")


def test_config_errors_are_specific():
    with pytest.raises(ConfigError, match="missing field 'hidden_size'"):
        config_from_hf({"model_type": "llama", "num_attention_heads": 4})
    with pytest.raises(UnsupportedError, match="rope_type 'yarn'"):
        config_from_hf({**_llama_dict(), "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ConfigError, match="not a multiple"):
        config_from_hf({**_llama_dict(), "num_key_value_heads": 3})
    with pytest.raises(UnsupportedError, match="activation 'relu6'"):
        config_from_hf({**_llama_dict(), "hidden_act": "relu6"})


def _llama_dict() -> dict:
    return {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64}


def test_param_count_matches_transformers(tiny_hf):
    name, folder, hf = tiny_hf
    m = veil.load(folder)
    assert m.cfg.n_params() == sum(p.numel() for p in hf.parameters()), name


def test_flop_count_is_two_per_weight_per_token():
    from veil.cost import forward_flops

    cfg = PRESETS["tiny-llama"]
    norms = (2 * cfg.n_layers + 1) * cfg.d_model
    assert forward_flops(cfg, 1, 0) == 2 * (cfg.n_params() - norms)
    # prefill of T tokens with the head on the last one only
    T = 10
    assert forward_flops(cfg, T, T, head_tokens=1) < forward_flops(cfg, T, T)
