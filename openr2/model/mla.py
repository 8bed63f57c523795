"""Multi-head Latent Attention (MLA) with two paths over one latent cache, and the contiguous latent cache.

Per token only the normalised latent c_kv [C] and the shared rotated rope key k_rope [R] are cached.
- `naive`: expand K/V from the latent through kv_b_proj and run torch's scaled_dot_product_attention with
  the explicit (YaRN-corrected) scale; the compute-bound path for prefill and training, flash kernels on GPU.
- `absorbed`: fold W_UK into the query and W_UV into the output, attending directly over the latent
  (MQA with one 576-dim key and one 512-dim value shared by all heads); the memory-bound decode path.
Both paths read and write the same cache, so a sequence may be prefilled with one and decoded with the other.
A training forward of the naive path (autograd recording, no cache, float32 on CPU) runs as one autograd
Function with a hand-written backward (`_NaiveAttention`); tests/model/test_mla.py checks it against autograd
over the plain naive code.

The cache protocol (the model never sees more of a cache than this; the engine's paged views implement it):
- `write(layer_idx, c_kv [B, T, C], k_rope [B, T, R])` stores the new tokens of a layer;
- `read(layer_idx)` -> (c_kv [B, S, C], k_rope [B, S, R]): every row's whole context, key j at position j
  (the naive path, which expands K/V from all of it anyway);
- `attend(layer_idx, q_latent [B, T, H, C], q_rope [B, T, H, R], positions [B, T], scale)` -> [B, T, H, C]:
  the absorbed path's read, softmax(scale (q_latent c_kv + q_rope k_rope)) c_kv over keys 0..p for the query
  at absolute position p. The cache owns it, so a paged cache can read its blocks where they lie;
  `attend_latent` below is the dense computation every implementation is checked against;
- `advance(num_tokens)`, once per forward after the last layer.
DeepSeek Sparse Attention (V3.2: model/indexer.py) adds three, which a cache for such a model implements:
- `write_indexer(layer_idx, k_index [B, T, Di])` stores the new tokens' indexer keys, beside their latents
  (same slots, same positions);
- `index_scores(layer_idx, q_index [B, T, Hi, Di], weights [B, T, Hi], positions [B, T], scale)` -> [B, T, S]
  float32: the indexer's score of every key of the row's context (this forward's included: the indexer
  writes its keys first) for each query, -inf past the query's position (`indexer.index_scores` over the
  keys read in order is the reference). The cache owns the scan, so a paged cache can score its blocks
  where they lie;
- `attend_sparse(layer_idx, q_latent, q_rope, positions, indices [B, T, K], scale)` -> [B, T, H, C]: `attend`
  over only the keys `indices` (key j at position j) that are at or before the query's position; the cache
  gathers their latents (a paged cache through its block tables). `attend_latent_sparse` below is the
  gather, `attend_latent` with the selection ANDed into the causal mask its dense reference.
The model asks for the indexer's three only when the config has an indexer; a cache without them cannot
serve such a model. A cache with `selects_always = True` (a compiled step's, which cannot branch on the
positions without a host sync) gets the top-k even when every key would fit: dense MLA up to rounding.
DeepSeek-V4 caches no latent: its cache kind is model/compressed.py's CompressedCache
(per layer a window of keys and the compressors' running state), used by the V4 layers alone.

With an indexer (V3.2) both paths attend over each query's top-k keys only: `naive` (the plain reference)
ANDs the selection into its causal mask; `absorbed` (the fast path) gathers the selected latents and attends
over those alone. When no query sees more than index_topk keys the indexer selects nothing away and both
paths run their dense code unchanged.

Shape legend: B batch, T query tokens, S key tokens, H heads, D hidden, C kv_lora_rank, R rope dim,
N qk_nope_head_dim, V v_head_dim, K keys selected per query, Hi/Di the indexer's heads and head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from openr2.config import ModelConfig
from openr2.model.indexer import Indexer, index_scores, selection_mask
from openr2.model.layers import Linear, RMSNorm, records_grad
from openr2.model.rope import apply_rope

ATTN_IMPLS = ("naive", "absorbed")


class LatentCache:
    """Contiguous latent KV cache: per layer c_kv [B, S_max, C] and k_rope [B, S_max, R], and for a model with
    an indexer (V3.2) its keys index_keys [B, S_max, Di].

    All rows share one length (no padding); `write` stores a layer's new tokens after those cached so far,
    `read` and `attend` see everything written; the model calls `advance` once per forward, after its last
    layer. Its `attend`, `index_scores` and `attend_sparse` are the dense references of the protocol's reads.
    """

    def __init__(self, num_layers: int, batch_size: int, max_tokens: int, kv_lora_rank: int,
                 rope_dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 index_head_dim: int = 0):
        self.c_kv = torch.zeros(num_layers, batch_size, max_tokens, kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(num_layers, batch_size, max_tokens, rope_dim, dtype=dtype, device=device)
        self.index_keys = torch.zeros(num_layers, batch_size, max_tokens, index_head_dim, dtype=dtype,
                                      device=device) if index_head_dim else None
        self.length = 0
        self._end = 0  # tokens written in this forward: length + T

    @classmethod
    def for_model(cls, config: ModelConfig, batch_size: int, max_tokens: int,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LatentCache:
        return cls(config.num_hidden_layers, batch_size, max_tokens, config.kv_lora_rank,
                   config.qk_rope_head_dim, dtype, device, config.index_head_dim if config.has_indexer else 0)

    @property
    def max_tokens(self) -> int:
        return self.c_kv.shape[2]

    def _span(self, num_new: int) -> tuple[int, int]:
        start, end = self.length, self.length + num_new
        if end > self.max_tokens:
            raise ValueError(f"latent cache holds {self.max_tokens} tokens; {end} requested")
        self._end = end
        return start, end

    def write(self, layer_idx: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        start, end = self._span(c_kv.shape[1])
        self.c_kv[layer_idx, :, start:end] = c_kv
        self.k_rope[layer_idx, :, start:end] = k_rope

    def write_indexer(self, layer_idx: int, k_index: torch.Tensor) -> None:
        if self.index_keys is None:
            raise ValueError("this latent cache holds no indexer keys; build it with LatentCache.for_model "
                             "(or index_head_dim) for a model with an indexer")
        start, end = self._span(k_index.shape[1])
        self.index_keys[layer_idx, :, start:end] = k_index

    def index_scores(self, layer_idx: int, q_index: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor,
                     scale: float) -> torch.Tensor:
        keys = self.index_keys[layer_idx, :, : self._end].to(q_index.dtype)
        return index_scores(q_index, keys, weights, scale, causal_mask(positions, keys.shape[1]))

    def attend_sparse(self, layer_idx: int, q_latent: torch.Tensor, q_rope: torch.Tensor, positions: torch.Tensor,
                      indices: torch.Tensor, scale: float) -> torch.Tensor:
        c_kv, k_rope = self.read(layer_idx)
        return attend_latent_sparse(q_latent, q_rope, c_kv.to(q_latent.dtype), k_rope.to(q_rope.dtype), indices,
                                    indices <= positions[:, :, None], scale)

    def read(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.c_kv[layer_idx, :, : self._end], self.k_rope[layer_idx, :, : self._end]

    def attend(self, layer_idx: int, q_latent: torch.Tensor, q_rope: torch.Tensor, positions: torch.Tensor,
               scale: float) -> torch.Tensor:
        c_kv, k_rope = self.read(layer_idx)
        B, T = positions.shape
        # a lone decode token of a one-row cache: the cache holds exactly the keys it may see
        mask = None if B == 1 and T == 1 else causal_mask(positions, c_kv.shape[1])
        return attend_latent(q_latent, q_rope, c_kv.to(q_latent.dtype), k_rope.to(q_rope.dtype), mask, scale)

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
        # DeepSeek Sparse Attention (V3.2): which keys each query attends to; None = dense MLA
        self.indexer = Indexer(config, layer_idx) if config.has_indexer else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None, attn_impl: str = "naive", kernel_impl: str = "eager") -> torch.Tensor:
        """x [B, T, D], positions [B, T] (absolute), cos/sin [B, T, R/2] -> [B, T, D]."""
        B, T, _ = x.shape
        k = kernel_impl
        xq = x if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x, k), inplace=True)
        q_proj = self.q_proj if self.q_lora_rank is None else self.q_b_proj
        # the indexer's top-k keys per query [B, T, K], or None: dense (no indexer, or a short context)
        topk = None if self.indexer is None else self.indexer(x, xq, positions, cos, sin, cache, k)
        if topk is None and cache is None and attn_impl == "naive" and _fused_training_ok(self, x, q_proj, k):
            c_kv, k_rope = self.kv_a_proj_with_mqa(x, k).split([self.kv_lora_rank, self.rope_dim], dim=-1)
            k_rope = apply_rope(k_rope, cos, sin, self.interleaved, k)
            out = _NaiveAttention.apply(xq, q_proj.weight, self.kv_a_layernorm(c_kv), self.kv_b_proj.weight,
                                        k_rope, cos, sin, self)
            return self.o_proj(out, k)
        q = q_proj(xq, k).view(B, T, self.num_heads, self.nope_dim + self.rope_dim)
        # The rope columns of q rotated in place (q is this forward's own projection): the naive path then
        # hands q to attention as it stands ([nope | rope] per head) instead of concatenating a copy.
        apply_rope(q[..., self.nope_dim:], cos[:, :, None], sin[:, :, None], self.interleaved, k, inplace=True)
        q_nope, q_rope = q[..., : self.nope_dim], q[..., self.nope_dim :]

        c_kv, k_rope = self.latent_kv(x, cos, sin, k)
        if cache is not None:
            cache.write(self.layer_idx, c_kv, k_rope)
        if attn_impl == "naive":
            if cache is None:
                mask = None  # plain causal over the T tokens themselves
                if topk is not None:
                    mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None]
            else:  # keys of the cache's contexts sit at positions 0..S-1
                c_kv, k_rope = cache.read(self.layer_idx)
                c_kv, k_rope = c_kv.to(x.dtype), k_rope.to(x.dtype)
                mask = causal_mask(positions, c_kv.shape[1])
            if topk is not None:  # the plain reference of sparse attention: the selection as a mask
                mask = mask & selection_mask(topk, c_kv.shape[1])
            out = self._attend_naive(q, c_kv, k_rope, mask, k)
        elif attn_impl == "absorbed":
            out = self._attend_absorbed(q_nope, q_rope, c_kv, k_rope, positions, cache, topk, k)
        else:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        return self.o_proj(out.reshape(B, T, self.num_heads * self.v_dim), k)

    def attention_probs(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        topk: torch.Tensor | None = None) -> torch.Tensor:
        """The attention distribution of a forward without a cache, for training's indexer loss (train/dsa.py):
        x [B, T, D] (this layer's input), cos/sin [B, T, R/2] -> P [B, H, T, T], softmax(scale q . k) over the
        causal keys, and only over the selected ones when topk [B, T, K] (the indexer's selection) is given.
        The plain formulas of the naive path, in float32 at least; forward does not use it (its attention
        output is P V, tests/model/test_mla.py)."""
        B, T, _ = x.shape
        xq = x if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))
        q_proj = self.q_proj if self.q_lora_rank is None else self.q_b_proj
        q = q_proj(xq).view(B, T, self.num_heads, self.nope_dim + self.rope_dim)
        q = torch.cat((q[..., : self.nope_dim],
                       apply_rope(q[..., self.nope_dim:], cos[:, :, None], sin[:, :, None], self.interleaved)), -1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope = apply_rope(k_rope, cos, sin, self.interleaved)
        k_nope = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(B, T, self.num_heads, -1)[..., : self.nope_dim]
        k = torch.cat((k_nope, k_rope[:, :, None].expand(B, T, self.num_heads, self.rope_dim)), dim=-1)
        dtype = torch.promote_types(q.dtype, torch.float32)
        scores = torch.einsum("bthd,bshd->bhts", q.to(dtype), k.to(dtype)) * self.scale
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None]
        if topk is not None:
            mask = mask & selection_mask(topk, T)
        return scores.masked_fill(~mask[:, None], float("-inf")).softmax(dim=-1)

    def latent_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  kernel_impl: str = "eager") -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache keeps of x's tokens [B, T, D]: the normalised latent c_kv [B, T, C] and the rotated
        rope key k_rope [B, T, R]."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x, kernel_impl).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv, inplace=True)  # over the projection's own columns (no grad)
        k_rope = apply_rope(k_rope, cos, sin, self.interleaved, kernel_impl)  # small; the norm's backward reads c_kv
        return c_kv, k_rope

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

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, positions, cache=None, topk=None,
                         kernel_impl="eager"):
        """Attend over the latent directly: q~ = W_UK^T q_nope, o = W_UV (P c_kv). Returns [B, T, H, V].

        Without a cache the keys are the T new tokens themselves (plain causal); with one, the cache reads
        its own keys (`attend`: a paged cache reads its blocks in place). With the indexer's topk [B, T, K],
        over the selected keys only (`attend_latent_sparse`, or the cache's `attend_sparse`). kernel_impl
        "compiled" on CPU writes the two per-head products as a product and a sum, which inductor fuses with
        their neighbours, where the weights stay in cache across the few query rows (up to 256 KiB; one row
        always: inductor writes a one-row bmm so itself); otherwise, as eagerly, as bmm (an external call).
        """
        B, T, H, N = q_nope.shape
        w = self.kv_b_proj.weight.view(H, N + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, :N], w[:, N:]  # [H, N, C], [H, V, C]
        fused = kernel_impl == "compiled" and q_nope.device.type == "cpu" and B * T <= 16 \
            and (B * T == 1 or w.numel() * w.element_size() <= 256 << 10)
        if fused:
            q_latent = (q_nope[..., None] * w_uk).sum(-2)  # [B, T, H, C]
        else:
            q_latent = torch.bmm(q_nope.reshape(B * T, H, N).transpose(0, 1), w_uk)  # [H, B*T, C]
            q_latent = q_latent.transpose(0, 1).view(B, T, H, -1)
        if cache is None and topk is None:
            causal = torch.ones(T, T, dtype=torch.bool, device=q_nope.device).tril()[None]
            o_latent = attend_latent(q_latent, q_rope, c_kv, k_rope, causal, self.scale)
        elif cache is None:  # key j is this forward's j-th token
            visible = topk <= torch.arange(T, device=topk.device)[None, :, None]
            o_latent = attend_latent_sparse(q_latent, q_rope, c_kv, k_rope, topk, visible, self.scale)
        elif topk is None:
            o_latent = cache.attend(self.layer_idx, q_latent, q_rope, positions, self.scale)
        else:
            o_latent = cache.attend_sparse(self.layer_idx, q_latent, q_rope, positions, topk, self.scale)
        if fused:
            return (o_latent[..., None, :] * w_uv).sum(-1)  # [B, T, H, V]
        out = torch.bmm(o_latent.reshape(B * T, H, -1).transpose(0, 1), w_uv.transpose(1, 2))  # [H, B*T, V]
        return out.transpose(0, 1).view(B, T, H, self.v_dim)


def attend_latent(q_latent: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
                  mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Dense latent attention: q_latent [B, T, H, C], q_rope [B, T, H, R] over c_kv [B, S, C], k_rope [B, S, R];
    mask [B, T, S] bool (True: visible), or None (every key visible). Returns [B, T, H, C] (q_latent's dtype).

    Heads fold into the query rows ([B, T*H, .]) so that each score / value product is one bmm against the
    shared latent: MQA with a (C + R)-dim key and a C-dim value.
    """
    B, T, H, C = q_latent.shape
    scores = torch.bmm(q_latent.reshape(B, T * H, C), c_kv.transpose(1, 2))  # [B, T*H, S]
    scores = torch.baddbmm(scores, q_rope.reshape(B, T * H, -1), k_rope.transpose(1, 2), alpha=scale, beta=scale)
    if mask is not None:
        scores = scores.view(B, T, H, -1).masked_fill(~mask[:, :, None, :], float("-inf")).view(B, T * H, -1)
    # float32 at least (float64 stays float64: the tests' reference runs)
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(c_kv.dtype)
    return torch.bmm(probs, c_kv).view(B, T, H, C)


def attend_latent_sparse(q_latent: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
                         indices: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """Latent attention over selected keys: for query (b, t) the keys indices[b, t] [K] of c_kv [B, S, C] /
    k_rope [B, S, R] where visible [B, T, K] (bool), gathered; q_latent [B, T, H, C], q_rope [B, T, H, R].
    Returns [B, T, H, C]. Equal to `attend_latent` with the selection ANDed into its mask (tests), reading
    K keys per query instead of S. Gathered latents are [B, t, K, C + R] for a chunk of t queries at a time.
    """
    B, T, H, C = q_latent.shape
    K, R = indices.shape[-1], q_rope.shape[-1]
    rows = torch.arange(B, device=indices.device)[:, None, None]
    step = max(1, _GATHER_CHUNK_ELEMENTS // max(1, B * K * (C + R)))
    out = []
    for t0 in range(0, T, step):
        idx = indices[:, t0 : t0 + step]
        t = idx.shape[1]
        c_sel = c_kv[rows, idx].reshape(B * t, K, C)  # [B t, K, C]
        r_sel = k_rope[rows, idx].reshape(B * t, K, R)
        q = q_latent[:, t0 : t0 + step].reshape(B * t, H, C)
        scores = torch.bmm(q, c_sel.transpose(1, 2))  # [B t, H, K]
        scores = torch.baddbmm(scores, q_rope[:, t0 : t0 + step].reshape(B * t, H, R), r_sel.transpose(1, 2),
                               alpha=scale, beta=scale)
        scores = scores.masked_fill(~visible[:, t0 : t0 + step].reshape(B * t, 1, K), float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(c_sel.dtype)
        out.append(torch.bmm(probs, c_sel).view(B, t, H, C))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


_GATHER_CHUNK_ELEMENTS = 1 << 24  # gathered latent elements per chunk of queries (attend_latent_sparse)


def _fused_training_ok(mla: MLA, x: torch.Tensor, q_proj: nn.Module, kernel_impl: str) -> bool:
    """Whether `_NaiveAttention` covers this call: autograd recording, float32 on CPU without autocast,
    plain projections without bias, and v shaped by a window of [k_nope | v] (R <= V <= N + R); otherwise
    autograd over the plain naive path."""
    w_q, w_kv = getattr(q_proj, "weight", None), getattr(mla.kv_b_proj, "weight", None)
    return (kernel_impl == "eager" and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and isinstance(q_proj, nn.Linear) and isinstance(mla.kv_b_proj, nn.Linear)
            and q_proj.bias is None and mla.kv_b_proj.bias is None
            and w_q.dtype == w_kv.dtype == torch.float32 and records_grad(x, w_q, w_kv)
            and mla.rope_dim <= mla.v_dim <= mla.nope_dim + mla.rope_dim)


class _NaiveAttention(torch.autograd.Function):
    """The naive path of a training forward (no cache, causal, CPU flash attention) from q's input and the
    normalised latent to the heads' concatenated outputs, with a hand-written backward.

    Autograd over the plain path records the rope written into q's slice (its backward clones q's whole
    gradient), K's concatenation and the slices of kv_b_proj's output (each slice's backward allocates a
    zero tensor of the whole [B, S, H, N + V] and copies into it, then the two are added) and the output's
    slice (zeros and a copy again). Here q, kv and K are this Function's own tensors: the backward runs the
    flash backward, turns q's rope columns back (the rotation's transpose: the angle negated), writes
    kv's gradient once ([dK_nope | dV]), sums dK_rope over heads, and does the four products.

    xq [B, T, Dq] (q_proj's or q_b_proj's input), w_q [H (N + R), Dq], c_kv [B, S, C] (normalised),
    w_kv [H (N + V), C], k_rope [B, S, R] (rotated), cos/sin [B, T, R/2] -> [B, T, H V].
    """

    @staticmethod
    def forward(ctx, xq, w_q, c_kv, w_kv, k_rope, cos, sin, mla):
        (B, T, _), S = xq.shape, c_kv.shape[1]
        H, N, R, V = mla.num_heads, mla.nope_dim, mla.rope_dim, mla.v_dim
        q = torch.mm(xq.reshape(B * T, -1), w_q.t()).view(B, T, H, N + R)
        apply_rope(q[..., N:], cos[:, :, None], sin[:, :, None], mla.interleaved, inplace=True)
        kv = torch.mm(c_kv.reshape(B * S, -1), w_kv.t()).view(B, S, H, N + V)
        key = torch.cat((kv[..., :N], k_rope[:, :, None].expand(B, S, H, R)), dim=-1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), key.transpose(1, 2), kv[..., V - R:].transpose(1, 2), 0.0, True, scale=mla.scale)
        ctx.save_for_backward(xq, w_q, c_kv, w_kv, q, key, kv, out, lse, cos, sin)
        ctx.mla = mla
        return out.transpose(1, 2)[..., N + R - V:].reshape(B, T, H * V)  # v's columns of the window

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        xq, w_q, c_kv, w_kv, q, key, kv, out, lse, cos, sin = ctx.saved_tensors
        mla = ctx.mla
        (B, T, H, _), S = q.shape, key.shape[1]
        N, R, V = mla.nope_dim, mla.rope_dim, mla.v_dim
        g_out = grad.new_zeros(B, T, H, N + R)  # the window's other columns were sliced off: zero gradient
        g_out[..., N + R - V:] = grad.view(B, T, H, V)
        g_q, g_key, g_value = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g_out.transpose(1, 2), q.transpose(1, 2), key.transpose(1, 2), kv[..., V - R:].transpose(1, 2),
            out, lse, 0.0, True, scale=mla.scale)
        del g_out
        g_q, g_key, g_value = g_q.transpose(1, 2), g_key.transpose(1, 2), g_value.transpose(1, 2)
        apply_rope(g_q[..., N:], cos[:, :, None], -sin[:, :, None], mla.interleaved, inplace=True)
        g_q = g_q.reshape(B * T, -1)
        need_xq, need_wq, need_ckv, need_wkv, need_rope = ctx.needs_input_grad[:5]
        grad_xq = torch.mm(g_q, w_q).view(xq.shape) if need_xq else None
        grad_w_q = torch.mm(g_q.t(), xq.reshape(B * T, -1)) if need_wq else None
        grad_k_rope = g_key[..., N:].sum(2) if need_rope else None
        g_kv = torch.cat((g_key[..., :N], g_value[..., N + R - V:]), dim=-1).view(B * S, -1)  # [dK_nope | dV]
        del g_key, g_value
        grad_c_kv = torch.mm(g_kv, w_kv).view(c_kv.shape) if need_ckv else None
        grad_w_kv = torch.mm(g_kv.t(), c_kv.reshape(B * S, -1)) if need_wkv else None
        return grad_xq, grad_w_q, grad_c_kv, grad_w_kv, grad_k_rope, None, None, None



def causal_mask(positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[B, T, S] bool: query at absolute position p sees keys at positions 0..p."""
    key_pos = torch.arange(num_keys, device=positions.device)
    return key_pos[None, None, :] <= positions[:, :, None]
