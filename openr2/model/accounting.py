"""Parameter and KV-cache accounting on the meta device (no memory, any model size).

DeepSeek's "activated parameters" convention: per token, the output head counts, the input embedding does
not (a lookup), routed experts count top-k of n, and MTP modules are excluded. A V3.2 lightning indexer is
used whole by every token: its parameters count in both totals (and on their own in `indexer_params`).

Cache bytes are bf16 elements: per token and layer MLA's latent and rope key, plus V3.2's indexer key (the
official kernels keep that key in FP8 with a scale; openr2 stores it in the model's dtype, as the latent).

DeepSeek-V4 caches no latent per token. Each layer keeps a window of `sliding_window` tokens (one head_dim
key = value each: a fixed cost once the context passes it); a CSA layer adds one head_dim entry and one
index_head_dim indexer key per `m` tokens, an HCA layer one head_dim entry per `m'` tokens. `cache_bytes(n)`
is that total at context n; `compressor_state_bytes` the compressors' running state per sequence (float32,
as DeepSeek's inference code keeps it: the pooled projections and gate scores of the last 2m tokens for the
overlapping CSA/indexer compressors, of the last m' for HCA), which does not grow with the context.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from openr2.config import ModelConfig
from openr2.model.indexer import Indexer
from openr2.model.moe import RoutedExperts
from openr2.model.transformer import Transformer

KV_BYTES_PER_ELEMENT = 2  # bf16
STATE_BYTES_PER_ELEMENT = 4  # float32 compressor state
CONTEXTS = (4096, 131072, 1048576)  # the context lengths `openr2 info` reports cache sizes at


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
    # DeepSeek-V4 (zero otherwise): the window's bytes over all layers once full, and per compressed layer
    # (tokens per entry, bytes per entry: entry + indexer key for CSA)
    window_bytes: int = 0
    compressed_layers: list = field(default_factory=list)  # [(rate, bytes per entry)] per CSA/HCA layer
    compressor_state_bytes: int = 0
    window_tokens: int = 0

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes_per_token_mha / self.kv_bytes_per_token_mla if self.kv_bytes_per_token_mla else 0.0

    @property
    def cache_bytes_per_token(self) -> int:
        """Every layer's cache per token: latent + rope key (+ indexer key); V4: the compressed entries' growth
        per token (the window aside), rounded."""
        if self.window_bytes:
            return round(sum(nbytes / rate for rate, nbytes in self.compressed_layers))
        return (self.kv_bytes_per_token_mla + self.index_bytes_per_token) * self.num_layers

    def cache_bytes(self, context_tokens: int) -> int:
        """The whole cache of one sequence of context_tokens (V4: windows, complete entries, indexer keys)."""
        if not self.window_bytes:
            return self.cache_bytes_per_token * context_tokens
        window = self.window_bytes * min(context_tokens, self.window_tokens) // self.window_tokens
        return window + sum(context_tokens // rate * nbytes for rate, nbytes in self.compressed_layers)

    def to_dict(self) -> dict:
        out = {**asdict(self), "kv_ratio": round(self.kv_ratio, 2), "cache_bytes_per_token": self.cache_bytes_per_token}
        if self.window_bytes:
            out["cache_bytes"] = {str(n): self.cache_bytes(n) for n in CONTEXTS}
        return out


def model_stats(config: ModelConfig) -> ModelStats:
    with torch.device("meta"):
        model = Transformer(config)
    if config.is_v4:
        return _v4_stats(config, model)
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


def _v4_stats(config: ModelConfig, model: Transformer) -> ModelStats:
    mtp = sum(p.numel() for p in model.mtp.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp
    routed = sum(p.numel() for m in model.layers.modules() if isinstance(m, RoutedExperts) for p in m.parameters())
    k, n = config.num_experts_per_tok, config.n_routed_experts
    active = total - model.embed_tokens.weight.numel() - (routed - routed * k // n)
    indexer = sum(p.numel() for layer in model.layers if layer.self_attn.compressor is not None
                  and hasattr(layer.self_attn.compressor, "indexer")
                  for p in layer.self_attn.compressor.indexer.parameters())
    Dh, Di, E = config.head_dim, config.index_head_dim or 0, KV_BYTES_PER_ELEMENT
    compressed, state = [], 0
    for i, kind in enumerate(config.layer_types):
        m = config.compress_rate(i)
        if kind == "compressed_sparse_attention":  # entry + indexer key; overlapping: 2m slots of 2 x width
            compressed.append((m, (Dh + Di) * E))
            state += 2 * (2 * m) * (2 * Dh + 2 * Di) * STATE_BYTES_PER_ELEMENT
        elif kind == "heavily_compressed_attention":
            compressed.append((m, Dh * E))
            state += 2 * m * Dh * STATE_BYTES_PER_ELEMENT
    return ModelStats(total, active, mtp, config.num_hidden_layers, 0, 0, indexer, Di * E,
                      config.num_hidden_layers * config.sliding_window * Dh * E, compressed, state,
                      config.sliding_window)
