"""Parameter and KV-cache accounting on the meta device (no memory, any model size).

DeepSeek's "activated parameters" convention: per token, the output head counts, the input embedding does
not (a lookup), routed experts count top-k of n, and MTP modules are excluded. A V3.2 lightning indexer is
used whole by every token: its parameters count in both totals (and on their own in `indexer_params`).

Cache bytes are bf16 elements: per token and layer MLA's latent and rope key, plus V3.2's indexer key (the
official kernels keep that key in FP8 with a scale; openr2 stores it in the model's dtype, as the latent).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from openr2.config import ModelConfig
from openr2.model.indexer import Indexer
from openr2.model.moe import RoutedExperts
from openr2.model.transformer import Transformer

KV_BYTES_PER_ELEMENT = 2  # bf16


@dataclass
class ModelStats:
    total_params: int  # main model, MTP excluded
    active_params: int  # per token, DeepSeek's convention
    mtp_params: int  # MTP modules' own parameters (embedding and head are shared)
    num_layers: int
    kv_bytes_per_token_mla: int  # per layer, bf16: latent c_kv + shared rope key
    kv_bytes_per_token_mha: int  # per layer, bf16: 2 x heads x head_dim, the MHA equivalent
    indexer_params: int = 0  # V3.2: the lightning indexers' parameters (main model; in the totals above)
    index_bytes_per_token: int = 0  # per layer, bf16: V3.2's indexer key beside the latent

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes_per_token_mha / self.kv_bytes_per_token_mla

    @property
    def cache_bytes_per_token(self) -> int:
        """Every layer's cache per token: latent + rope key (+ indexer key)."""
        return (self.kv_bytes_per_token_mla + self.index_bytes_per_token) * self.num_layers

    def to_dict(self) -> dict:
        return {**asdict(self), "kv_ratio": round(self.kv_ratio, 2), "cache_bytes_per_token": self.cache_bytes_per_token}


def model_stats(config: ModelConfig) -> ModelStats:
    with torch.device("meta"):
        model = Transformer(config)
    mtp = sum(p.numel() for p in model.mtp.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp  # tied weights are counted once by parameters()
    routed = sum(p.numel() for m in model.layers.modules() if isinstance(m, RoutedExperts) for p in m.parameters())
    k, n = config.num_experts_per_tok, config.n_routed_experts
    inactive_routed = routed - routed * k // n if n else 0
    embedding = 0 if config.tie_word_embeddings else model.embed_tokens.weight.numel()
    mla = (config.kv_lora_rank + config.qk_rope_head_dim) * KV_BYTES_PER_ELEMENT
    # The DeepSeek-V2 paper's MHA baseline: 2 n_h d_h elements, d_h the per-head (nope) dim.
    mha = 2 * config.num_attention_heads * config.qk_nope_head_dim * KV_BYTES_PER_ELEMENT
    indexer = sum(p.numel() for m in model.layers.modules() if isinstance(m, Indexer) for p in m.parameters())
    index = config.index_head_dim * KV_BYTES_PER_ELEMENT if config.has_indexer else 0
    return ModelStats(total, total - embedding - inactive_routed, mtp, config.num_hidden_layers, mla, mha,
                      indexer, index)
