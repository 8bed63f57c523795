"""The decoder blocks: `DecoderLayer` (pre-norm MLA + dense MLP or MoE), `MTPLayer`, the multi-token
prediction block (DeepSeek-V3) built on it, and `HyperDecoderLayer` (DeepSeek-V4: compressed attention and
V4's MoE between hyper-connections). model/transformer.py stacks them.

Multi-token prediction: extra decoder blocks that draft the token after next. Depth k at position i:
x = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]) (embedding first, as the checkpoints and vLLM order
it), then a full decoder block, then shared_head.norm and the main model's head. Embedding and head are shared with the main model; the checkpoint's copies under
`model.layers.{N+k}.` are dropped on load and written back on save (model/hf_io.py).
Its parameter names equal the checkpoint's names under `model.layers.{N+k}.`.

Shape legend: B batch, T tokens, D hidden.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from openr2.config import ModelConfig
from openr2.model.compressed import CompressedAttention
from openr2.model.hyper import HyperConnection, HyperHead, hyper_residual
from openr2.model.layers import MLP, Float32RMSNorm, RMSNorm
from openr2.model.mla import MLA
from openr2.model.moe import MoE
from openr2.model.moe_v4 import V4MoE


class DecoderLayer(nn.Module):
    """Pre-norm residual block: h = x + MLA(norm(x)); out = h + FFN(norm(h))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(config, layer_idx)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, positions, cos, sin, cache=None, attn_impl="naive", moe_impl="grouped", kernel_impl="eager"):
        # residual sums written into the sublayer's own fresh output (x + y == y + x, bit for bit)
        x = self.self_attn(self.input_layernorm(x), positions, cos, sin, cache, attn_impl, kernel_impl).add_(x)
        h = self.post_attention_layernorm(x)
        return (self.mlp(h, moe_impl, kernel_impl) if isinstance(self.mlp, MoE) else self.mlp(h, kernel_impl)).add_(x)


class MTPLayer(DecoderLayer):
    """A multi-token prediction depth: eh_proj of the normed next embedding and hidden state, then the block."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(d, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, positions, cos, sin,
                moe_impl: str = "grouped", cache=None, attn_impl: str = "naive",
                kernel_impl: str = "eager") -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, D] (h^{k-1}), next_embeds [B, T, D] (Emb(t_{i+k})) -> (block output h^k [B, T, D],
        shared_head.norm(h^k), what the LM head reads). The norm is applied here so that every parameter
        of this layer is used inside its own forward (FSDP gathers a layer's weights only there).
        A cache (drafting in the engine) holds this layer's keys under its own layer index."""
        h = self.block(self.combine(hidden, next_embeds), positions, cos, sin, cache, attn_impl, moe_impl,
                       kernel_impl)
        return h, self.shared_head.norm(h)

    def combine(self, hidden: torch.Tensor, next_embeds: torch.Tensor) -> torch.Tensor:
        """The block's input: eh_proj of [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)] [B, T, D]."""
        return self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))

    def block(self, x, positions, cos, sin, cache=None, attn_impl="naive", moe_impl="grouped", kernel_impl="eager"):
        """The decoder block over the combined input x [B, T, D] -> h^k [B, T, D]."""
        return super().forward(x, positions, cos, sin, cache, attn_impl, moe_impl, kernel_impl)


class HyperDecoderLayer(nn.Module):
    """DeepSeek-V4 block over hc_mult residual streams X [B, T, n, D]: each sublayer reads
    norm(sum_k pre_k X_k) and writes X'_k = post_k out + sum_j comb[j, k] X_j (model/hyper.py)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = CompressedAttention(config, layer_idx)
        self.mlp = V4MoE(config, layer_idx)
        self.input_layernorm = Float32RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Float32RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn_hc = HyperConnection(config)
        self.ffn_hc = HyperConnection(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ropes: dict, input_ids: torch.Tensor | None,
                moe_impl: str = "grouped", cache=None, attn_impl: str = "naive") -> torch.Tensor:
        collapsed, post, comb = self.attn_hc(x)
        attn = self.self_attn(self.input_layernorm(collapsed), positions, ropes, cache, attn_impl)
        x = hyper_residual(x, attn, post, comb)
        collapsed, post, comb = self.ffn_hc(x)
        out = self.mlp(self.post_attention_layernorm(collapsed), input_ids, moe_impl)
        return hyper_residual(x, out, post, comb)


def v4_mtp_config(config: ModelConfig) -> ModelConfig:
    """The config V4's MTP blocks are built from: their layers appended to the schedule as sliding-window
    attention and score-routed MoE (the release's compress_ratios end in 0 for the MTP layer; its gate has a
    bias, no hash table: vLLM's and the release's `mtp.0.ffn.gate.bias`)."""
    k = config.num_nextn_predict_layers
    return dataclasses.replace(config, num_hidden_layers=config.num_hidden_layers + k,
                               layer_types=list(config.layer_types) + ["sliding_attention"] * k,
                               mlp_layer_types=list(config.mlp_layer_types) + ["moe"] * k)


class HyperMTPLayer(HyperDecoderLayer):
    """DeepSeek-V4's multi-token prediction depth, as vLLM runs the release's `mtp.{k}.*` (transformers drops
    them): the previous depth's residual streams H [B, T, n, D] (the main model's before its hc_head) and the
    next token's embedding e give X_j = h_proj(hnorm(H_j)) + e_proj(enorm(e)) per stream; one V4 block;
    then its own hc_head and norm before the shared head. `mtp_config` is v4_mtp_config(config)."""

    def __init__(self, mtp_config: ModelConfig, layer_idx: int):
        super().__init__(mtp_config, layer_idx)
        d, eps = mtp_config.hidden_size, mtp_config.rms_norm_eps
        self.enorm = Float32RMSNorm(d, eps)
        self.hnorm = Float32RMSNorm(d, eps)
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.hc_head = HyperHead(mtp_config)
        self.norm = Float32RMSNorm(d, eps)

    def forward(self, streams: torch.Tensor, next_embeds: torch.Tensor, positions: torch.Tensor, ropes: dict,
                moe_impl: str = "grouped", attn_impl: str = "naive") -> tuple[torch.Tensor, torch.Tensor]:
        """streams [B, T, n, D], next_embeds [B, T, D] (Emb(t_{i+k})) -> (block output streams [B, T, n, D],
        norm(hc_head(streams)) [B, T, D], what the LM head reads)."""
        x = self.h_proj(self.hnorm(streams)) + self.e_proj(self.enorm(next_embeds)).unsqueeze(-2)
        h = super().forward(x, positions, ropes, None, moe_impl, None, attn_impl)
        return h, self.norm(self.hc_head(h))
