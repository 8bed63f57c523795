"""Multi-head Latent Attention (MLA) with two paths over one latent cache, and the contiguous latent cache.

Per token only the normalised latent c_kv [C] and the shared rotated rope key k_rope [R] are cached.
- `naive`: expand K/V from the latent through kv_b_proj and run torch's scaled_dot_product_attention with
  the explicit (YaRN-corrected) scale; the compute-bound path for prefill and training, flash kernels on GPU.
- `absorbed`: fold W_UK into the query and W_UV into the output, attending directly over the latent
  (MQA with one 576-dim key and one 512-dim value shared by all heads); the memory-bound decode path.
Both paths read and write the same cache, so a sequence may be prefilled with one and decoded with the other.

Shape legend: B batch, T query tokens, S key tokens, H heads, D hidden, C kv_lora_rank, R rope dim,
N qk_nope_head_dim, V v_head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openr2.config import ModelConfig
from openr2.model.layers import Linear, RMSNorm
from openr2.model.rope import apply_rope

ATTN_IMPLS = ("naive", "absorbed")


class LatentCache:
    """Contiguous latent KV cache: per layer c_kv [B, S_max, C] and k_rope [B, S_max, R].

    All rows share one length (no padding); `update` writes a layer's new tokens and returns everything
    cached so far for that layer; the model calls `advance` once per forward, after its last layer.
    """

    def __init__(self, num_layers: int, batch_size: int, max_tokens: int, kv_lora_rank: int,
                 rope_dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.c_kv = torch.zeros(num_layers, batch_size, max_tokens, kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(num_layers, batch_size, max_tokens, rope_dim, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def for_model(cls, config: ModelConfig, batch_size: int, max_tokens: int,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LatentCache:
        return cls(config.num_hidden_layers, batch_size, max_tokens, config.kv_lora_rank,
                   config.qk_rope_head_dim, dtype, device)

    @property
    def max_tokens(self) -> int:
        return self.c_kv.shape[2]

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_rope: torch.Tensor):
        start, end = self.length, self.length + c_kv.shape[1]
        if end > self.max_tokens:
            raise ValueError(f"latent cache holds {self.max_tokens} tokens; {end} requested")
        self.c_kv[layer_idx, :, start:end] = c_kv
        self.k_rope[layer_idx, :, start:end] = k_rope
        return self.c_kv[layer_idx, :, :end], self.k_rope[layer_idx, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_lora_rank = config.v_head_dim, config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        self.scale = config.softmax_scale
        self.interleaved = config.rope_interleave
        d, h, qk = config.hidden_size, config.num_attention_heads, config.qk_head_dim
        bias = config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = Linear(d, h * qk, bias=False)
        else:
            self.q_a_proj = Linear(d, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)  # eps 1e-6 whatever rms_norm_eps says (as HF)
            self.q_b_proj = Linear(self.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = Linear(self.kv_lora_rank, h * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(h * self.v_dim, d, bias=bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None, attn_impl: str = "naive", kernel_impl: str = "eager") -> torch.Tensor:
        """x [B, T, D], positions [B, T] (absolute), cos/sin [B, T, R/2] -> [B, T, D]."""
        B, T, _ = x.shape
        k = kernel_impl
        q = self.q_proj(x, k) if self.q_lora_rank is None else \
            self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x, k), inplace=True), k)
        q = q.view(B, T, self.num_heads, self.nope_dim + self.rope_dim)
        # The rope columns of q rotated in place (q is this forward's own projection): the naive path then
        # hands q to attention as it stands ([nope | rope] per head) instead of concatenating a copy.
        apply_rope(q[..., self.nope_dim:], cos[:, :, None], sin[:, :, None], self.interleaved, k, inplace=True)
        q_nope, q_rope = q[..., : self.nope_dim], q[..., self.nope_dim :]

        c_kv, k_rope = self.kv_a_proj_with_mqa(x, k).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_rope = apply_rope(k_rope, cos, sin, self.interleaved, k)  # small, and the norm's backward reads c_kv
        if cache is not None:
            c_kv, k_rope = cache.update(self.layer_idx, c_kv, k_rope)

        # Causal mask from absolute positions; keys of a contiguous cache sit at positions 0..S-1.
        S = c_kv.shape[1]
        if S == T and cache is None:
            mask = None  # plain causal
        elif B == 1 and T == 1 and attn_impl == "absorbed":
            mask = _ALL_VISIBLE  # a lone decode token: its cache holds exactly the keys it may see
        else:
            mask = _causal_mask(positions, S)
        if attn_impl == "naive":
            out = self._attend_naive(q, c_kv, k_rope, mask, k)
        elif attn_impl == "absorbed":
            out = self._attend_absorbed(q_nope, q_rope, c_kv, k_rope, mask)
        else:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        return self.o_proj(out.reshape(B, T, self.num_heads * self.v_dim), k)

    def _attend_naive(self, q, c_kv, k_rope, mask, kernel_impl="eager"):
        """q [B,T,H,N+R] (rope part rotated); expand the latent into per-head K [B,S,H,N+R] and V; SDPA.
        Returns [B, T, H, V]."""
        B, S, _ = c_kv.shape
        H, N, R, V = self.num_heads, self.nope_dim, self.rope_dim, self.v_dim
        kv = self.kv_b_proj(c_kv, kernel_impl).view(B, S, H, N + V)  # per head [k_nope | v]
        k = torch.cat((kv[..., :N], k_rope[:, :, None].expand(B, S, H, R)), dim=-1)
        v, v_cols = kv[..., N:], slice(0, V)
        # torch's CPU flash kernel needs one head dim for q, k and v; otherwise SDPA falls back to the
        # math path (full [B,H,T,S] scores, a safe softmax, no causal skipping: 2-3x slower at prefill).
        # Output columns are independent (column j of the output mixes column j of v only), so v may carry
        # extra finite columns that are sliced off afterwards: when V < N + R, v is the last N + R columns
        # of each head's [k_nope | v] (the tail of k_nope, then v: a view, no copy) if V >= R, else v
        # padded with zeros. Zero-padded q/k add nothing to the scores. On CUDA the memory-efficient and
        # cuDNN kernels take unequal dims, so this is done on CPU only.
        if q.device.type == "cpu" and V < N + R:
            if V >= R:
                v, v_cols = kv[..., V - R:], slice(N + R - V, N + R)
            else:
                v = F.pad(v, (0, N + R - V))
        elif q.device.type == "cpu" and V > N + R:
            q, k = F.pad(q, (0, V - N - R)), F.pad(k, (0, V - N - R))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None],
            is_causal=mask is None, scale=self.scale,
        )
        return out.transpose(1, 2)[..., v_cols]

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Attend over the latent directly: q~ = W_UK^T q_nope, o = W_UV (P c_kv). Returns [B, T, H, V].

        Heads fold into the query rows ([B, T*H, .]) so that each score / value product is one bmm
        against the shared latent: MQA with a (C + R)-dim key and a C-dim value.
        """
        B, T, H, N = q_nope.shape
        w = self.kv_b_proj.weight.view(H, N + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, :N], w[:, N:]  # [H, N, C], [H, V, C]
        q_latent = torch.bmm(q_nope.reshape(B * T, H, N).transpose(0, 1), w_uk)  # [H, B*T, C]
        q_latent = q_latent.transpose(0, 1).reshape(B, T * H, -1)
        scores = torch.bmm(q_latent, c_kv.transpose(1, 2))  # [B, T*H, S]
        scores = torch.baddbmm(scores, q_rope.reshape(B, T * H, -1), k_rope.transpose(1, 2), alpha=self.scale,
                               beta=self.scale)
        if mask is None:  # plain causal over the T tokens themselves
            mask = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()[None]
        if mask is not _ALL_VISIBLE:
            scores = scores.view(B, T, H, -1).masked_fill(~mask[:, :, None, :], float("-inf")).view(B, T * H, -1)
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(c_kv.dtype)
        o_latent = torch.bmm(probs, c_kv)  # [B, T*H, C]
        out = torch.bmm(o_latent.view(B * T, H, -1).transpose(0, 1), w_uv.transpose(1, 2))  # [H, B*T, V]
        return out.transpose(0, 1).view(B, T, H, self.v_dim)


_ALL_VISIBLE = object()  # mask sentinel: every cached key is visible to every query (one-token decode)


def _causal_mask(positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[B, T, S] bool: query at absolute position p sees keys at positions 0..p."""
    key_pos = torch.arange(num_keys, device=positions.device)
    return key_pos[None, None, :] <= positions[:, :, None]
