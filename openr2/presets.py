"""Named model configs as plain functions: test configs, the benchmark model, and the official ones.

Official values are those of the released config.json files (DeepSeek-V3/R1, V3.2, V2, V2-Lite).

DeepSeek-V4-Flash / -Pro: transformers 5.24's DeepseekV4Config defaults (= Flash's dimensions) and its
docstrings (Pro: hidden 7168, 128 heads, 16 output groups), with the layer schedules, Pro's remaining sizes and
the YaRN of the compressed branches from the released config.json files as quoted in
shared/reference/deepseek_v32_v4.md section 3 (Pro's marked unconfirmed there: 61 layers, q_lora 1536, 384
experts of 3072, index_topk 1024). Their totals land on the model cards' 284B / 13B active (Flash) and
1.6T / 49B active (Pro): tests/test_cli.py.
"""

from __future__ import annotations

import dataclasses

from openr2.config import ModelConfig

_YARN_V3 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
_YARN_V2 = {**_YARN_V3, "mscale": 0.707, "mscale_all_dim": 0.707}


def deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 / R1 (671B total, ~37B active)."""
    return ModelConfig(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8, routed_scaling_factor=2.5,
        n_group=8, topk_group=4, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        first_k_dense_replace=3, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840, rope_scaling=dict(_YARN_V3),
        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16",
        quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                             "weight_block_size": [128, 128]},
    )


def deepseek_v32() -> ModelConfig:
    """DeepSeek-V3.2 (-Exp): V3's dimensions plus DeepSeek Sparse Attention, a lightning indexer of 64 heads x
    128 dims in every layer keeping 2048 keys per query; FP8 weights with UE8M0 (power-of-two) block scales."""
    v3 = deepseek_v3()
    return dataclasses.replace(
        v3, model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048,
        quantization_config={**v3.quantization_config, "scale_fmt": "ue8m0"},
    )


def deepseek_v2() -> ModelConfig:
    """DeepSeek-V2 (236B total, ~21B active)."""
    return ModelConfig(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
        moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128,
        n_shared_experts=2, n_routed_experts=160, num_experts_per_tok=6, routed_scaling_factor=16.0,
        n_group=8, topk_group=3, topk_method="group_limited_greedy", scoring_func="softmax",
        norm_topk_prob=False, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=1536,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
        rope_scaling=dict(_YARN_V2), bos_token_id=100000, eos_token_id=100001, aux_loss_alpha=0.001,
        torch_dtype="bfloat16",
    )


def deepseek_v2_lite() -> ModelConfig:
    """DeepSeek-V2-Lite (15.7B total, ~2.4B active): no q compression, 64 experts, greedy routing."""
    return ModelConfig(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, routed_scaling_factor=1.0,
        n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
        first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840, rope_scaling=dict(_YARN_V2),
        bos_token_id=100000, eos_token_id=100001, aux_loss_alpha=0.001, torch_dtype="bfloat16",
    )


def tiny_v3() -> ModelConfig:
    """A few-hundred-thousand-parameter V3 (q LoRA, YaRN, sigmoid + group-limited routing, MTP) for tests."""
    return ModelConfig(
        model_type="deepseek_v3", vocab_size=256, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1,
        n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=2.5, n_group=4, topk_group=2,
        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, max_position_embeddings=512,
        rope_scaling={**_YARN_V3, "factor": 4, "original_max_position_embeddings": 128},
        num_nextn_predict_layers=1,
    )


def tiny_v32() -> ModelConfig:
    """tiny_v3 with V3.2's sparse attention: 16 indexer heads x 32 dims (8 of them rotated) keeping 8 keys, so
    that prompts of a few dozen tokens are attended sparsely."""
    return dataclasses.replace(tiny_v3(), model_type="deepseek_v32", index_n_heads=16, index_head_dim=32,
                               index_topk=8)


_YARN_V4 = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}
_V4_KINDS = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


def deepseek_v4_flash() -> ModelConfig:
    """DeepSeek-V4-Flash (284B total, 13B active): 43 layers, 2 sliding / 21 CSA / 20 HCA (the release's
    compress_ratios [0, 0] + [4, 128] x 20 + [4], its MTP layer's trailing 0 dropped), 3 hash-routed layers,
    FP8 linears and FP4 experts."""
    ratios = [0, 0] + [4, 128] * 20 + [4]
    return ModelConfig(
        model_type="deepseek_v4", vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048,
        num_hidden_layers=43, num_attention_heads=64, num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64,
        q_lora_rank=1024, n_routed_experts=256, num_experts_per_tok=6, n_shared_experts=1,
        scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, norm_topk_prob=True, topk_method="noaux_tc",
        layer_types=[_V4_KINDS[r] for r in ratios], mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 40,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        sliding_window=128, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, o_groups=8, o_lora_rank=1024,
        swiglu_limit=10.0, index_n_heads=64, index_head_dim=128, index_topk=512,
        max_position_embeddings=1048576, rope_theta=10000.0, compress_rope_theta=160000.0,
        rope_scaling=dict(_YARN_V4), num_nextn_predict_layers=1, rms_norm_eps=1e-6, bos_token_id=0,
        eos_token_id=1, torch_dtype="bfloat16",
        quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                             "weight_block_size": [128, 128], "expert_dtype": "fp4"},
    )


def deepseek_v4_pro() -> ModelConfig:
    """DeepSeek-V4-Pro (1.6T total, 49B active): 61 layers, 31 HCA / 30 CSA ([128, 128] + [4, 128] x 29 + [4]),
    hidden 7168, 128 heads in 16 output groups, 384 experts of 3072, top-1024 indexer."""
    ratios = [128, 128] + [4, 128] * 29 + [4]
    return dataclasses.replace(
        deepseek_v4_flash(), hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
        n_routed_experts=384, moe_intermediate_size=3072, o_groups=16, index_topk=1024,
        layer_types=[_V4_KINDS[r] for r in ratios], mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 58,
    )


def tiny_v4() -> ModelConfig:
    """A tiny DeepSeek-V4 for tests: every attention kind (window 16; CSA 4:1 with a top-8 indexer; HCA 16:1),
    2 hyper-connection streams, hash-routed then scored MoE, YaRN on the compressed branches. Prompts of
    ~100-300 tokens make the window, both compressors and the indexer's selection all decide."""
    return ModelConfig(
        model_type="deepseek_v4", vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, qk_rope_head_dim=8, q_lora_rank=32,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, scoring_func="sqrtsoftplus",
        routed_scaling_factor=1.5, norm_topk_prob=True, topk_method="noaux_tc",
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        sliding_window=16, hc_mult=2, hc_sinkhorn_iters=20, hc_eps=1e-6, o_groups=2, o_lora_rank=16,
        swiglu_limit=10.0, index_n_heads=16, index_head_dim=16, index_topk=8, max_position_embeddings=1024,
        rope_theta=10000.0, compress_rope_theta=160000.0,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 256, "beta_fast": 32,
                      "beta_slow": 1},
        num_nextn_predict_layers=0, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
    )


def v4_demo() -> ModelConfig:
    """The small DeepSeek-V4 the `v4-demo` recipe trains (`openr2 train --preset v4-demo`, 4K contexts): hidden
    128 in 4 layers (sliding / CSA 4:1 with an 8 x 32 indexer keeping 64 entries / HCA 128:1 / CSA), window 128,
    4 heads of 64 (rope 16) over one shared KV head, 2 hyper-connection streams, a hash-routed then scored MoE
    (8 experts top-2 + 1 shared), one MTP module. The compressed branches' YaRN stretches 8K positions by 128
    (to 1M); the window's rope is unscaled (it only sees 128 tokens). vocab_size is the tokenizer's."""
    return dataclasses.replace(
        tiny_v4(), vocab_size=512, hidden_size=128, moe_intermediate_size=128, head_dim=64, qk_rope_head_dim=16,
        q_lora_rank=64, compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        sliding_window=128, o_lora_rank=64, index_n_heads=8, index_head_dim=32, index_topk=64,
        max_position_embeddings=1048576,
        rope_scaling={"type": "yarn", "factor": 128, "original_max_position_embeddings": 8192, "beta_fast": 32,
                      "beta_slow": 1},
        num_nextn_predict_layers=1,
    )


def tiny_v2() -> ModelConfig:
    """A V2-Lite-shaped test model: plain q_proj, softmax greedy routing, no YaRN, two dense layers."""
    return ModelConfig(
        model_type="deepseek_v2", vocab_size=256, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, n_shared_experts=2,
        n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=1.0, n_group=1, topk_group=1,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, first_k_dense_replace=2,
        kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=512, rope_scaling=None, bos_token_id=0, eos_token_id=1,
    )


def bench_moe() -> ModelConfig:
    """The forward-benchmark model: 6 layers, hidden 256, 16 experts top-2 (bench/forward.py)."""
    return ModelConfig(
        model_type="deepseek_v3", vocab_size=4096, hidden_size=256, intermediate_size=768,
        moe_intermediate_size=256, num_hidden_layers=6, num_attention_heads=4, n_shared_experts=1,
        n_routed_experts=16, num_experts_per_tok=2, routed_scaling_factor=2.5, n_group=4, topk_group=2,
        first_k_dense_replace=1, kv_lora_rank=128, q_lora_rank=192, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, max_position_embeddings=4096,
        rope_scaling={**_YARN_V3, "factor": 4, "original_max_position_embeddings": 1024},
    )


def small_moe() -> ModelConfig:
    """A ~12M-parameter MoE+MLA model (6 layers, hidden 256, 16 experts top-2) for engine benchmarks."""
    return ModelConfig(
        model_type="deepseek_v3", vocab_size=4096, hidden_size=256, intermediate_size=768,
        moe_intermediate_size=128, num_hidden_layers=6, num_attention_heads=8, n_shared_experts=1,
        n_routed_experts=16, num_experts_per_tok=2, routed_scaling_factor=2.5, n_group=4, topk_group=2,
        first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, max_position_embeddings=8192, rope_scaling=None,
    )


def demo() -> ModelConfig:
    """The bundled demo model (`openr2 train --preset demo`): MLA + DeepSeekMoE (8 routed experts top-2 + 1
    shared, sigmoid noaux_tc routing), ~1.1M active of ~2.4M parameters, and one MTP module (the engine's
    speculative draft); vocab_size is the tokenizer's."""
    return ModelConfig(
        model_type="deepseek_v3", vocab_size=512, hidden_size=128, intermediate_size=384,
        moe_intermediate_size=128, num_hidden_layers=5, num_attention_heads=4, n_shared_experts=1,
        n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=2.5, n_group=1, topk_group=1,
        first_k_dense_replace=1, kv_lora_rank=48, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, max_position_embeddings=1024, rope_scaling=None, num_nextn_predict_layers=1,
    )


PRESETS = {
    "deepseek-v3": deepseek_v3,
    "deepseek-r1": deepseek_v3,
    "deepseek-v3.2": deepseek_v32,
    "deepseek-v4-flash": deepseek_v4_flash,
    "deepseek-v4-pro": deepseek_v4_pro,
    "deepseek-v2": deepseek_v2,
    "deepseek-v2-lite": deepseek_v2_lite,
    "tiny-v3": tiny_v3,
    "tiny-v32": tiny_v32,
    "tiny-v4": tiny_v4,
    "tiny-v2": tiny_v2,
    "v4-demo": v4_demo,
    "bench-moe": bench_moe,
    "small-moe": small_moe,
    "demo": demo,
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    config = PRESETS[name]()
    config.source = f"preset {name}"
    config.validate()
    return config
