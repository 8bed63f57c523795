"""DeepSeek-V4 attention: one shared KV head over a sliding window, plus (per layer, by `layer_types`)
compressed entries of the whole past.

- `sliding_attention`: the window alone (the last `sliding_window` tokens, the query's own included).
- `heavily_compressed_attention` (HCA): a `Compressor` pools every `m'` tokens (128 in the release) into one
  entry, a per-channel softmax over the block's slots of gate + position bias; every complete past entry is
  attended, beside the window.
- `compressed_sparse_attention` (CSA): entries of `m` tokens (4) pooled over overlapping blocks (entry w
  mixes the first half-channels of block w-1 with the second half of block w: 2m slots); a lightning
  indexer (`CompressedIndexer`, with its own small compressor) scores the entries per query and only its
  top `index_topk` are attended, beside the window.
Entry w summarises tokens up to (w+1)m - 1 and is visible to the query at position t once it is complete:
w < (t+1) // m. An incomplete trailing block makes no entry.

Keys are values (K = V, one head shared by all query heads), rotated on their trailing `qk_rope_head_dim`
channels (interleaved pairs); the output's rope channels are rotated back by the query's position, so what
an entry contributes depends only on relative distance. A learned per-head sink logit joins each softmax
as an extra column that is then dropped. The output projection is grouped and low-rank: head groups go
through block-diagonal `o_a_proj` (each group to `o_lora_rank`), then `o_b_proj` mixes them.

Sliding layers rotate with the main table (rope_theta, no scaling), CSA/HCA layers and their compressors and
indexer with the compressed table (compress_rope_theta, YaRN without an attention factor).

This is the plain path: the whole sequence from position 0 (prompts, training, full-forward greedy) with a
dense masked softmax over [window keys ; entries]. Parameter names are transformers' DeepseekV4 modules'.

Shape legend: B batch, T tokens (queries and window keys), N compressed entries, H heads, Dh head_dim,
R rope dim, M block size (compress rate), G output groups, Hi/Di the indexer's heads and head dim.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from openr2.config import ModelConfig
from openr2.model.layers import RMSNorm
from openr2.model.rope import RotaryEmbedding, apply_rope


def v4_rotaries(config: ModelConfig) -> tuple[RotaryEmbedding, RotaryEmbedding]:
    """(main, compressed) rope tables: main at rope_theta unscaled, compressed at compress_rope_theta with the
    config's YaRN and attention factor 1 (V4 scales neither cos/sin nor the softmax)."""
    main = RotaryEmbedding(dataclasses.replace(config, rope_scaling=None))
    yarn = {**config.rope_scaling, "attention_factor": 1.0} if config.rope_scaling else None
    compress = RotaryEmbedding(dataclasses.replace(config, rope_theta=config.compress_rope_theta, rope_scaling=yarn))
    return main, compress


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing 2 * cos.shape[-1] channels of x [..., Dh] (interleaved pairs) in float32; the
    leading channels pass unchanged. cos/sin broadcast against x[..., :R/2] (put a head axis in them first)."""
    r = 2 * cos.shape[-1]
    rotated = apply_rope(x[..., -r:].float(), cos.float(), sin.float())
    return torch.cat((x[..., :-r], rotated.to(x.dtype)), dim=-1)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class Compressor(nn.Module):
    """Gated pooling of every `rate` tokens into one `dim`-channel entry, normed and rotated at the block's first
    position. `overlap` (CSA): projections are 2 x dim wide, entry w pools block w-1's first halves with
    block w's second halves (2 x rate slots; block -1 is absent: weight 0)."""

    def __init__(self, hidden_size: int, dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        width = 2 * dim if overlap else dim
        self.dim, self.rate, self.overlap = dim, rate, overlap
        self.kv_proj = nn.Linear(hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width))
        self.kv_norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] (tokens 0..T-1), cos/sin [B, T, R/2] of the compressed table -> entries [B, T // M, dim]."""
        B, T, _ = x.shape
        M, N, d = self.rate, T // self.rate, self.dim
        kv = self.kv_proj(x[:, : N * M]).view(B, N, M, -1)
        gate = self.gate_proj(x[:, : N * M]).view(B, N, M, -1) + self.position_bias
        if self.overlap:  # slots [B, N, 2M, d]: block w-1's first halves, then block w's second halves
            prev_kv = F.pad(kv[:, :-1, :, :d], (0, 0, 0, 0, 1, 0))
            prev_gate = F.pad(gate[:, :-1, :, :d], (0, 0, 0, 0, 1, 0), value=float("-inf"))
            kv = torch.cat((prev_kv, kv[..., d:]), dim=2)
            gate = torch.cat((prev_gate, gate[..., d:]), dim=2)
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)
        starts = torch.arange(N, device=x.device) * M  # an entry rotates at its block's first position
        return rope_tail(self.kv_norm(pooled), cos[:, starts], sin[:, starts])


def entry_visible(positions: torch.Tensor, num_entries: int, rate: int) -> torch.Tensor:
    """[B, T, N] bool: entry w is complete for the query at position t (w < (t + 1) // rate)."""
    w = torch.arange(num_entries, device=positions.device)
    return w < ((positions + 1) // rate)[..., None]


def compressed_index_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor,
                            visible: torch.Tensor) -> torch.Tensor:
    """q [B, T, Hi, Di], keys [B, N, Di], weights [B, T, Hi] (scales folded in) -> float32 scores [B, T, N],
    sum_h weights[h] * ReLU(q_h . k) / sqrt(Di), -inf on entries the query cannot see. A module function so
    that tests can record the scores (tests/v4.py)."""
    dots = torch.einsum("bthd,bnd->bthn", q.float(), keys.float()).relu_() * q.shape[-1] ** -0.5
    scores = torch.einsum("bthn,bth->btn", dots, weights.float())
    return scores.masked_fill(~visible, float("-inf"))


class CompressedIndexer(Compressor):
    """CSA's lightning indexer: its own overlapping compressor at index_head_dim (its tensors directly under
    `indexer.`, as transformers names them), queries from the q latent, top `index_topk` visible entries per
    query."""

    def __init__(self, config: ModelConfig, rate: int):
        Hi, Di = config.index_n_heads, config.index_head_dim
        super().__init__(config.hidden_size, Di, rate, overlap=True, eps=config.rms_norm_eps)
        self.num_heads, self.head_dim, self.topk = Hi, Di, config.index_topk
        self.q_b_proj = nn.Linear(config.q_lora_rank, Hi * Di, bias=False)
        self.scorer = nn.Module()  # transformers' name for the head weights' owner
        self.scorer.weights_proj = nn.Linear(config.hidden_size, Hi, bias=False)

    def select(self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        """-> selected [B, T, N] bool: the query's top-k visible entries."""
        B, T, _ = x.shape
        keys = self(x, cos, sin)  # [B, N, Di]
        q = rope_tail(self.q_b_proj(q_latent).view(B, T, self.num_heads, self.head_dim), cos[:, :, None],
                      sin[:, :, None])
        weights = self.scorer.weights_proj(x).float() * self.num_heads ** -0.5
        visible = entry_visible(positions, keys.shape[1], self.rate)
        scores = compressed_index_scores(q, keys, weights, visible)
        k = min(self.topk, keys.shape[1])
        picked = torch.zeros_like(visible)
        if k:
            picked.scatter_(-1, scores.topk(k, dim=-1).indices, True)
        return picked & visible  # picks among -inf scores (fewer than k visible) are dropped


class CompressedAttention(nn.Module):
    """One V4 attention layer of the kind config.layer_types[layer_idx] (see the module docstring)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        H, Dh, D = config.num_attention_heads, config.head_dim, config.hidden_size
        self.num_heads, self.head_dim, self.window = H, Dh, config.sliding_window
        self.kind, self.rate = config.layer_types[layer_idx], config.compress_rate(layer_idx)
        self.groups, eps = config.o_groups, config.rms_norm_eps
        self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(config.q_lora_rank, eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, H * Dh, bias=False)
        self.kv_proj = nn.Linear(D, Dh, bias=False)
        self.kv_norm = RMSNorm(Dh, eps)
        # block-diagonal: group g maps its H*Dh/G channels to rows [g*o_lora_rank, (g+1)*o_lora_rank)
        self.o_a_proj = nn.Linear(H * Dh // config.o_groups, config.o_groups * config.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(config.o_groups * config.o_lora_rank, D, bias=False)
        self.sinks = nn.Parameter(torch.zeros(H))
        self.compressor = None
        if self.rate:
            csa = self.kind == "compressed_sparse_attention"
            self.compressor = Compressor(D, Dh, self.rate, overlap=csa, eps=eps)
            if csa:
                self.compressor.indexer = CompressedIndexer(config, self.rate)
        self.eps, self.scale = eps, Dh ** -0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ropes: dict) -> torch.Tensor:
        """x [B, T, D] (positions 0..T-1), ropes {"main", "compress"}: (cos, sin) [B, T, R/2] -> [B, T, D]."""
        B, T, _ = x.shape
        cos, sin = ropes["compress" if self.rate else "main"]
        hc, hs = cos[:, :, None], sin[:, :, None]  # broadcast over heads
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent).view(B, T, self.num_heads, self.head_dim)
        q = rope_tail(unweighted_rms_norm(q, self.eps), hc, hs)
        kv = rope_tail(self.kv_norm(self.kv_proj(x)), cos, sin)  # [B, T, Dh]
        ahead = positions[:, :, None] - positions[:, None, :]  # [B, T, T]: query position - key position
        mask = (ahead >= 0) & (ahead < self.window)
        keys = kv
        if self.compressor is not None:
            entries = self.compressor(x, cos, sin)  # [B, N, Dh]
            seen = entry_visible(positions, entries.shape[1], self.rate)
            if getattr(self.compressor, "indexer", None) is not None:
                seen = seen & self.compressor.indexer.select(x, q_latent, positions, cos, sin)
            keys, mask = torch.cat((kv, entries), dim=1), torch.cat((mask, seen), dim=-1)
        out = attend_with_sinks(q, keys, mask, self.sinks, self.scale)  # [B, T, H, Dh]
        out = rope_tail(out, hc, -hs)  # values carry rope: rotate back by the query's position
        return self.o_b_proj(self._grouped_out(out))

    def _grouped_out(self, out: torch.Tensor) -> torch.Tensor:
        """[B, T, H, Dh] -> [B, T, G * o_lora_rank]: group g's heads through its block of o_a_proj."""
        B, T = out.shape[:2]
        G = self.groups
        w = self.o_a_proj.weight.view(G, -1, self.o_a_proj.in_features)  # [G, r, H*Dh/G]
        return torch.einsum("btgi,gri->btgr", out.reshape(B, T, G, -1), w).reshape(B, T, -1)


def attend_with_sinks(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q [B, T, H, Dh], keys (= values) [B, S, Dh], mask [B, T, S] bool, sinks [H] -> [B, T, H, Dh]:
    softmax over [scale q.k (masked) ; sink_h] in float32, the sink's column dropped."""
    logits = torch.einsum("bthd,bsd->bhts", q, keys) * scale
    logits = logits.masked_fill(~mask[:, None], float("-inf")).float()
    sink = sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
    probs = torch.cat((logits, sink), dim=-1).softmax(dim=-1)[..., :-1]
    return torch.einsum("bhts,bsd->bthd", probs.to(keys.dtype), keys)
