"""ModelConfig: reading HF config.json (both rope spellings), validation errors, to_hf round trips, presets."""

from __future__ import annotations

import dataclasses
import json

import pytest

from openr2.config import ModelConfig
from openr2.presets import (
    PRESETS,
    deepseek_v2_lite,
    deepseek_v3,
    deepseek_v32,
    get_preset,
    tiny_v2,
    tiny_v3,
    tiny_v32,
)

# The released DeepSeek-V3 config.json, abridged to the keys that change the math.
V3_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "num_nextn_predict_layers": 1, "bos_token_id": 0, "eos_token_id": 1,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "torch_dtype": "bfloat16", "tie_word_embeddings": False, "hidden_act": "silu",
}


# The released DeepSeek-V3.2(-Exp) config.json: V3's plus the indexer's keys and UE8M0 scales.
V32_JSON = {**V3_JSON, "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
            "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048,
            "quantization_config": {**V3_JSON["quantization_config"], "scale_fmt": "ue8m0"}}


def test_reads_released_v3_config_like_the_preset():
    config = ModelConfig.from_hf(V3_JSON, source="v3/config.json")
    assert config == deepseek_v3()
    assert config.softmax_scale == pytest.approx(0.1352338, abs=1e-7)  # 1/sqrt(192) * mscale(40, 1)^2


def test_reads_released_v32_config_like_the_preset():
    config = ModelConfig.from_hf(V32_JSON, source="v32/config.json")
    assert config == deepseek_v32() and config.has_indexer and not config.is_v3
    assert (config.index_n_heads, config.index_head_dim, config.index_topk) == (64, 128, 2048)
    assert config.softmax_scale == deepseek_v3().softmax_scale
    # V2/V3 configs know no indexer, whatever stray keys they carry
    v3 = ModelConfig.from_hf({**V3_JSON, "index_topk": 16})
    assert v3 == deepseek_v3() and not v3.has_indexer and "index_topk" not in v3.to_hf()


def test_reads_v32_config_as_transformers_writes_it():
    import transformers

    hf = transformers.DeepseekV32Config(index_topk=256, first_k_dense_replace=2).to_dict()
    assert "mlp_layer_types" in hf and "layer_types" in hf
    config = ModelConfig.from_hf(hf)
    assert config.model_type == "deepseek_v32" and config.index_topk == 256
    assert (config.index_n_heads, config.index_head_dim) == (64, 128)  # transformers' defaults are ours
    assert (config.topk_method, config.scoring_func, config.moe_layer_freq) == ("noaux_tc", "sigmoid", 1)
    assert [config.is_moe_layer(i) for i in range(3)] == [False, False, True]


def test_v2_lite_softmax_scale_and_null_q_lora():
    config = deepseek_v2_lite()
    assert config.q_lora_rank is None
    assert config.softmax_scale == pytest.approx(0.114721, abs=1e-6)  # mscale(40, 0.707)^2 = 1.589626
    raw = config.to_hf()
    assert raw["q_lora_rank"] is None and ModelConfig.from_hf(raw) == config


def test_rope_parameters_and_legacy_rope_scaling_agree():
    legacy = ModelConfig.from_hf(V3_JSON)
    modern = dict(V3_JSON)
    del modern["rope_scaling"], modern["rope_theta"]
    modern["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40, "beta_fast": 32,
                                 "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                                 "original_max_position_embeddings": 4096}
    assert ModelConfig.from_hf(modern) == legacy
    plain = {**modern, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}
    assert ModelConfig.from_hf(plain).rope_scaling is None
    assert ModelConfig.from_hf(plain).rope_theta == 50000.0


def test_v2_defaults_follow_model_type():
    config = ModelConfig.from_hf({"model_type": "deepseek_v2", "num_hidden_layers": 2, "n_routed_experts": 8,
                                  "num_experts_per_tok": 2})
    assert (config.scoring_func, config.topk_method, config.norm_topk_prob) == ("softmax", "greedy", False)


@pytest.mark.parametrize("make", [tiny_v3, tiny_v2, deepseek_v3, deepseek_v2_lite, tiny_v32, deepseek_v32])
def test_to_hf_loads_in_transformers(make):
    import transformers

    config = make()
    hf = transformers.AutoConfig.for_model(**config.to_hf())
    assert hf.model_type == config.model_type
    assert hf.q_lora_rank == config.q_lora_rank and hf.kv_lora_rank == config.kv_lora_rank
    assert hf.n_routed_experts == config.n_routed_experts
    expected_rope = "yarn" if config.rope_scaling else "default"
    assert hf.rope_parameters["rope_type"] == expected_rope
    if config.is_v3:
        assert hf.num_mtp_layers == config.num_nextn_predict_layers
    if config.has_indexer:
        assert type(hf).__name__ == "DeepseekV32Config"
        assert (hf.index_n_heads, hf.index_head_dim, hf.index_topk) == (
            config.index_n_heads, config.index_head_dim, config.index_topk)
        assert hf.mlp_layer_types == ["sparse" if config.is_moe_layer(i) else "dense"
                                      for i in range(config.num_hidden_layers)]
        back = ModelConfig.from_hf(hf.to_dict())  # transformers' own config.json reads back as ours
        assert dataclasses.replace(back, torch_dtype=None) == dataclasses.replace(
            config, quantization_config=None, torch_dtype=None)
    else:
        assert not any(k.startswith("index_") for k in config.to_hf())


def test_save_and_from_pretrained_round_trip(tmp_path):
    config = tiny_v3()
    config.save_pretrained(tmp_path)
    back = ModelConfig.from_pretrained(tmp_path)
    assert back == config and back.source == str(tmp_path / "config.json")


@pytest.mark.parametrize("key, value, match", [
    ("model_type", "llama", "model_type"),
    ("hidden_size", 0, "hidden_size"),
    ("hidden_size", "big", "hidden_size"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim"),
    ("n_group", 3, "n_group"),
    ("topk_group", 9, "topk_group"),
    ("num_experts_per_tok", 300, "num_experts_per_tok"),
    ("topk_method", "random", "topk_method"),
    ("scoring_func", "softmax", "scoring_func"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope_type"),
    ("rope_scaling", {"type": "yarn", "factor": -1}, "factor"),
    ("moe_layer_freq", 0, "moe_layer_freq"),
])
def test_bad_values_name_file_and_key(tmp_path, key, value, match):
    file = tmp_path / "config.json"
    file.write_text(json.dumps({**V3_JSON, key: value}))
    with pytest.raises(ValueError, match=match) as err:
        ModelConfig.from_pretrained(tmp_path)
    assert str(file) in str(err.value)


@pytest.mark.parametrize("key, value, match", [
    ("index_topk", 0, "index_topk"),
    ("index_n_heads", "many", "index_n_heads"),
    ("index_head_dim", 32, "index_head_dim"),  # below qk_rope_head_dim (64)
    ("q_lora_rank", None, "q_lora_rank"),
    ("rope_interleave", False, "rope_interleave"),
    ("moe_layer_freq", 2, "moe_layer_freq"),
    ("topk_method", "group_limited_greedy", "topk_method"),
    ("mlp_layer_types", ["dense"] * 61, "mlp_layer_types"),
])
def test_bad_v32_values_name_file_and_key(tmp_path, key, value, match):
    file = tmp_path / "config.json"
    raw = {**V32_JSON, key: value}
    if key == "topk_method":
        raw["scoring_func"] = "softmax"
    file.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match) as err:
        ModelConfig.from_pretrained(tmp_path)
    assert str(file) in str(err.value)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        ModelConfig.from_pretrained(tmp_path)


def test_moe_layer_rule():
    config = dataclasses.replace(tiny_v2(), num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert [config.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]


def test_all_presets_validate():
    for name in PRESETS:
        assert get_preset(name).source == f"preset {name}"
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("gpt-5")
