"""Test helpers: tiny transformers DeepSeek checkpoints with perturbed (never trivial) weights."""

from __future__ import annotations

import torch

from openr2.config import ModelConfig


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Add noise to every parameter (norm weights leave 1, biases leave 0) and randomise correction biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * scale)
        for name, b in sorted(module.named_buffers()):
            if "e_score_correction_bias" in name:
                b.copy_(torch.rand(b.shape, generator=gen) * 0.1)
            elif name.endswith("tid2eid"):  # V4's hash table starts at zero (every token to expert 0, k times)
                experts = module.config.n_routed_experts
                b.copy_(torch.rand(b.shape[0], experts, generator=gen).argsort(-1)[:, : b.shape[1]])


def hf_model(config: ModelConfig, seed: int = 0):
    """A float32 transformers model for `config` with perturbed weights, in eval mode."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    cls = {"deepseek_v2": transformers.DeepseekV2ForCausalLM, "deepseek_v3": transformers.DeepseekV3ForCausalLM,
           "deepseek_v32": transformers.DeepseekV32ForCausalLM,
           "deepseek_v4": transformers.DeepseekV4ForCausalLM}[config.model_type]
    torch.manual_seed(seed)
    model = cls(hf_config).float().eval()
    perturb_(model, seed)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
