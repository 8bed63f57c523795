"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2): which keys each query attends to.

Per token the indexer computes H query heads q[t, h] = wq_b(c_q[t]) from MLA's normalised q latent (c_q =
q_a_layernorm(q_a_proj(x)), shared with MLA), one key k[s] = LayerNorm(wk(x[s])) shared by all heads, and head
weights w[t, h] = weights_proj(x[t]) / sqrt(H), x being the attention's input (after input_layernorm). q and k
rotate their first R dims by RoPE in the half-split (NeoX) layout, with MLA's cos/sin (YaRN's factor
included); their last D - R dims stay as they are. The score of key s for query t is

    I[t, s] = sum_h w[t, h] ReLU(q[t, h] . k[s] / sqrt(D))

over the keys t may see (s <= t; the others are -inf), and MLA attends over the `index_topk` best only (all
of them when fewer are visible). Every step is transformers' DeepseekV32Indexer: the same products in the
same order and precision (q . k and the head sum in float32, the head weights' projection kept in float32),
and like it no Hadamard rotation (an orthogonal map, q . k unchanged) and no FP8 rounding of q and k, which
the official kernels add. The top-k is model/topk.py's exact two-stage one over long rows: torch.topk's
values; ties at the k-th score may take other indices (which transformers leaves to torch.topk).

The selection is discrete: the indexer runs without autograd, so the language-model loss trains nothing in
it (as in transformers; the indexer's own KL loss is training's business, through `scores`).

When no query can see more than index_topk keys, every visible key is selected and the attention is exactly
MLA's dense one: `Indexer.forward` returns None (after writing its keys to the cache) and MLA runs its dense
code, bit for bit.

- `Indexer.forward` -> the top-k key indices [B, T, K] (key j at position j, or the j-th of this forward's
  tokens without a cache), or None (dense). Early queries of a long prompt get some keys past their
  position among their K (their visible keys are fewer than K); attention masks those, as transformers does.
- `index_scores`: the dense score computation; a cache's `index_scores` (mla.py's protocol) must equal it.
- `selection_mask`: the plain path's boolean mask over keys, ANDed with the causal mask over MLA.

Shape legend: B batch, T query tokens, S key tokens, H indexer heads, D index_head_dim, R rope dim (the first R
of D), K selected keys, Q q_lora_rank, X hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openr2.config import ModelConfig
from openr2.model.layers import Linear
from openr2.model.rope import apply_rope
from openr2.model.topk import top_k_indices

# the [B, T, H, S] float32 products of `index_scores` are made this many elements at most at a time
_SCORE_CHUNK_ELEMENTS = 1 << 26


class HeadWeights(nn.Module):
    """weights_proj: x [..., X] -> [..., H]. Kept in float32 whatever the model's dtype (transformers'
    `_keep_in_fp32_modules`), x cast to it. Not an nn.Linear, so weight-only quantization leaves it float (the
    release stores it unquantized too)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


class Indexer(nn.Module):
    """Parameter names as transformers' and the release's: self_attn.indexer.{wq_b, wk, k_norm, weights_proj}."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.index_topk, self.rope_dim = config.index_topk, config.qk_rope_head_dim
        self.scale = self.head_dim**-0.5
        self.wq_b = Linear(config.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.wk = Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = HeadWeights(config.hidden_size, self.num_heads)

    # ------------------------------------------------------------------ the three projections
    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernel_impl: str = "eager") -> torch.Tensor:
        """x [B, T, X] -> k [B, T, D] (normalised, rotated): what a cache stores per token."""
        return self._rope(self.k_norm(self.wk(x, kernel_impl)), cos, sin)

    def queries(self, xq: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kernel_impl: str = "eager") -> torch.Tensor:
        """c_q [B, T, Q] -> q [B, T, H, D] (rotated)."""
        B, T, _ = xq.shape
        q = self.wq_b(xq, kernel_impl).view(B, T, self.num_heads, self.head_dim)
        return self._rope(q, cos[:, :, None], sin[:, :, None])

    def head_weights(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, X] -> w [B, T, H] in float32 (at least), 1/sqrt(H) folded in."""
        return self.weights_proj(x).float() * self.num_heads**-0.5

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        R = self.rope_dim
        return torch.cat((apply_rope(t[..., :R], cos, sin, interleaved=False), t[..., R:]), dim=-1)

    # ------------------------------------------------------------------ selection
    def scores(self, x: torch.Tensor, xq: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               kernel_impl: str = "eager") -> torch.Tensor:
        """The causal scores [B, T, T] of T tokens among themselves (no cache), differentiable."""
        T = x.shape[1]
        visible = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None]
        return index_scores(self.queries(xq, cos, sin, kernel_impl), self.keys(x, cos, sin, kernel_impl),
                            self.head_weights(x), self.scale, visible)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, xq: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, cache=None, kernel_impl: str = "eager") -> torch.Tensor | None:
        """x [B, T, X] (the attention's input), xq [B, T, Q] (MLA's normalised q latent), positions [B, T]
        -> top-k key indices [B, T, K] (int64), or None when every query sees at most index_topk keys.

        Without a cache the keys are the T tokens themselves (plain causal, as MLA); with one, this forward's
        keys are written first (`write_indexer`) and the cache scores every key it holds (`index_scores`)."""
        T = x.shape[1]
        if cache is None:
            if T <= self.index_topk:  # the t-th token sees t + 1 keys
                return None
            return top_k_indices(self.scores(x, xq, cos, sin, kernel_impl), self.index_topk)
        cache.write_indexer(self.layer_idx, self.keys(x, cos, sin, kernel_impl))
        # position p sees p + 1 keys. A cache that scores inside a compiled step (`selects_always`) skips this
        # check, a host sync: its top-k then holds every visible key, dense MLA up to rounding
        always = getattr(cache, "selects_always", False)
        if not always and int(positions.max()) < self.index_topk:
            return None
        scores = cache.index_scores(self.layer_idx, self.queries(xq, cos, sin, kernel_impl), self.head_weights(x),
                                    positions, self.scale)
        if always:  # K more -inf columns: a top-K exists whatever the context, with no branch on its size (so
            # one torch.topk, not top_k_indices' two stages, which branch on it)
            pad = scores.new_full((*scores.shape[:2], self.index_topk), float("-inf"))
            return torch.cat((scores, pad), dim=-1).topk(self.index_topk, dim=-1).indices
        return top_k_indices(scores, self.index_topk)


def index_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float,
                 visible: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, T, H, D], k [B, S, D], weights [B, T, H] -> I [B, T, S] in float32 (float64 stays float64),
    -inf where `visible` [B or 1, T, S] (bool) is False. transformers' products, in its order: q . k per
    head ([H, D] x [D, S] for each query), times the scale, ReLU, then the weights' [1, H] x [H, S]."""
    B, T, H, _ = q.shape
    S = k.shape[1]
    kt = k.transpose(-1, -2).float().unsqueeze(1)  # [B, 1, D, S]
    step = max(1, _SCORE_CHUNK_ELEMENTS // max(1, B * H * S))
    out = []
    for t0 in range(0, T, step):  # one chunk for the sizes of tests and short prompts
        s = F.relu(torch.matmul(q[:, t0 : t0 + step].float(), kt) * scale)  # [B, t, H, S]
        out.append(torch.matmul(weights[:, t0 : t0 + step].unsqueeze(-2), s).squeeze(-2))  # [B, t, S]
    scores = out[0] if len(out) == 1 else torch.cat(out, dim=1)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def selection_mask(indices: torch.Tensor, num_keys: int) -> torch.Tensor:
    """indices [B, T, K] -> [B, T, S] bool, True at the selected keys (the plain path's mask over MLA)."""
    B, T, _ = indices.shape
    mask = torch.zeros(B, T, num_keys, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices, True)
