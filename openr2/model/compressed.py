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

One path, a dense masked softmax over [window keys ; entries], serves the whole sequence from position 0
(prompts, training) and, with a `CompressedCache`, chunked prefill and decode: the cache keeps each layer's
last sliding_window - 1 keys and each compressor's `CompressorState` (the incomplete block's projections, the
last block's overlap halves, the entries), so a forward sees exactly the keys the full forward would
(tests/model/test_v4_cache.py). Parameter names are transformers' DeepseekV4 modules'.

Shape legend: B batch, T tokens (queries and window keys), N compressed entries, H heads, Dh head_dim,
R rope dim, M block size (compress rate), G output groups, Hi/Di the indexer's heads and head dim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from openr2.config import ModelConfig
from openr2.model.layers import Float32RMSNorm
from openr2.model.rope import RotaryEmbedding, apply_rope
from openr2.model.topk import top_k_indices

V4_ATTN_IMPLS = ("naive", "sparse")
SCORE_CHUNK_ELEMENTS = 1 << 26  # indexer products [B, t, Hi, N] formed at once (compressed_index_scores)
WINDOW_QUERY_BLOCK = 256  # queries per window-attention block of a long chunk (CompressedAttention.forward)


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


@dataclass
class CompressorState:
    """One compressor's running state between forwards (CompressedCache keeps one per compressor)."""
    pending_kv: torch.Tensor | None = None  # [B, < M, width]: projections of the incomplete block, no bias yet
    pending_gate: torch.Tensor | None = None
    prev_kv: torch.Tensor | None = None  # [B, M, d]: the last complete block's first halves (overlap only),
    prev_gate: torch.Tensor | None = None  # its gates with the position bias added
    entries: torch.Tensor | None = None  # [B, N, d]: every entry so far
    rate: int = 0  # tokens per entry (set by the compressor that fills it)
    # overlap only: the last forward's complete blocks' first halves (kv, gate with bias) [B, n, M, d] each,
    # so that a paged cache can keep the overlap state at each of its block boundaries (engine/v4_cache.py)
    block_halves: tuple | None = None

    # The entries' protocol, which a paged cache implements over its pool (engine/v4_cache.py): the attention
    # asks for all of them (dense HCA, the indexer's scan, the masked reference) or only the selected ones.
    @property
    def num_entries(self) -> int:
        return 0 if self.entries is None else self.entries.shape[1]

    def extend(self, new: torch.Tensor) -> None:
        """Append this forward's new entries [B, n, d]."""
        self.entries = new if self.entries is None else torch.cat((self.entries, new), dim=1)

    def all(self) -> torch.Tensor:
        """Every entry so far [B, N, d]."""
        return self.entries

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """The entries at indices [B, T, k] (each < num_entries): [B, T, k, d]."""
        return take_entries(self.entries, indices)

    def index_scores(self, q: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The indexer's scores of every entry (this state holds the indexer's): `compressed_index_scores` over
        `all()`; a paged cache scores its entries where they lie."""
        keys = self.all()
        return compressed_index_scores(q, keys, weights, entry_visible(positions, keys.shape[1], self.rate))


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
        self.kv_norm = Float32RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, state: CompressorState | None = None) -> torch.Tensor:
        """x [B, T, D] -> every entry so far [B, N, dim]. Without a state x holds tokens 0..T-1 and a trailing
        incomplete block is dropped; with one, x continues the state's tokens (`update`) and the incomplete
        block waits in it. `rotary` is the compressed rope table (entries rotate at their block's first
        position)."""
        if state is not None:
            self.update(x, rotary, state)
            return state.all()
        kv, gate = self.kv_proj(x), self.gate_proj(x)
        usable = kv.shape[1] // self.rate * self.rate
        return self._pool(kv[:, :usable], gate[:, :usable], 0, rotary, None)

    def update(self, x: torch.Tensor, rotary: RotaryEmbedding, state: CompressorState) -> None:
        """Continue the state's tokens with x [B, T, D]: the blocks it completes become entries (state.extend)."""
        kv, gate = self.kv_proj(x), self.gate_proj(x)
        first, state.rate = state.num_entries, self.rate
        if state.pending_kv is not None:
            kv, gate = torch.cat((state.pending_kv, kv), dim=1), torch.cat((state.pending_gate, gate), dim=1)
        usable = kv.shape[1] // self.rate * self.rate
        new = self._pool(kv[:, :usable], gate[:, :usable], first, rotary, state)
        state.pending_kv, state.pending_gate = kv[:, usable:], gate[:, usable:]
        state.extend(new)

    def _pool(self, kv, gate, first: int, rotary: RotaryEmbedding, state: CompressorState | None):
        """Complete blocks kv, gate [B, N * M, width] -> entries first..first+N-1 [B, N, dim]."""
        B, M, d = kv.shape[0], self.rate, self.dim
        N = kv.shape[1] // M
        if N == 0:
            return kv.new_zeros(B, 0, d)
        kv = kv.view(B, N, M, -1)
        gate = gate.view(B, N, M, -1) + self.position_bias
        if self.overlap:  # slots [B, N, 2M, d]: block w-1's first halves, then block w's second halves
            has_prev = state is not None and state.prev_kv is not None
            prev_kv = state.prev_kv if has_prev else kv.new_zeros(B, M, d)
            prev_gate = state.prev_gate if has_prev else gate.new_full((B, M, d), float("-inf"))
            if state is not None:
                state.prev_kv, state.prev_gate = kv[:, -1, :, :d], gate[:, -1, :, :d]
                state.block_halves = kv[..., :d], gate[..., :d]
            kv = torch.cat((torch.cat((prev_kv[:, None], kv[:, :-1, :, :d]), dim=1), kv[..., d:]), dim=2)
            gate = torch.cat((torch.cat((prev_gate[:, None], gate[:, :-1, :, :d]), dim=1), gate[..., d:]), dim=2)
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)
        starts = ((first + torch.arange(N, device=kv.device)) * M).expand(B, N)
        cos, sin = rotary(starts, kv.dtype)
        return rope_tail(self.kv_norm(pooled), cos, sin)


def entry_visible(positions: torch.Tensor, num_entries: int, rate: int) -> torch.Tensor:
    """[B, T, N] bool: entry w is complete for the query at position t (w < (t + 1) // rate)."""
    w = torch.arange(num_entries, device=positions.device)
    return w < ((positions + 1) // rate)[..., None]


def compressed_index_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor,
                            visible: torch.Tensor) -> torch.Tensor:
    """q [B, T, Hi, Di], keys [B, N, Di], weights [B, T, Hi] (scales folded in) -> float32 scores [B, T, N],
    sum_h weights[h] * ReLU(q_h . k) / sqrt(Di), -inf on entries the query cannot see. A module function so
    that tests can record the scores (tests/v4.py). The [B, t, Hi, N] products are the step's largest tensor
    (a long prompt chunk over a long context): formed SCORE_CHUNK_ELEMENTS at a time, t queries per chunk."""
    B, T, Hi, _ = q.shape
    kt, step = keys.float(), max(1, SCORE_CHUNK_ELEMENTS // max(1, B * Hi * keys.shape[1]))
    out = []
    for t0 in range(0, T, step):
        dots = torch.einsum("bthd,bnd->bthn", q[:, t0 : t0 + step].float(), kt).relu_() * q.shape[-1] ** -0.5
        out.append(torch.einsum("bthn,bth->btn", dots, weights[:, t0 : t0 + step].float()))
    scores = out[0] if len(out) == 1 else torch.cat(out, dim=1)
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

    def queries(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the indexer's queries [B, T, Hi, Di], rotated; its head weights [B, T, Hi] in float32)."""
        B, T, _ = x.shape
        q = rope_tail(self.q_b_proj(q_latent).view(B, T, self.num_heads, self.head_dim), cos[:, :, None],
                      sin[:, :, None])
        return q, self.scorer.weights_proj(x).float() * self.num_heads ** -0.5

    @torch.no_grad()  # a discrete choice: nothing it returns carries gradient (training's KL rescores, csa_loss.py)
    def select(self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, rotary: RotaryEmbedding,
               state: CompressorState | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (indices [B, T, k], valid [B, T, k]): the query's top-k entries, k = min(index_topk, N); a pick
        is invalid where fewer than k entries are visible (its score was -inf)."""
        if state is None:  # no cache: the entries of the whole sequence
            state = CompressorState(entries=self(x, rotary), rate=self.rate)
        else:
            self.update(x, rotary, state)
        scores = state.index_scores(*self.queries(x, q_latent, cos, sin), positions)  # [B, T, N]
        indices = top_k_indices(scores, self.topk)
        return indices, indices < ((positions + 1) // self.rate)[..., None]


class CompressedAttention(nn.Module):
    """One V4 attention layer of the kind config.layer_types[layer_idx] (see the module docstring)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        H, Dh, D = config.num_attention_heads, config.head_dim, config.hidden_size
        self.num_heads, self.head_dim, self.window = H, Dh, config.sliding_window
        self.kind, self.rate = config.layer_types[layer_idx], config.compress_rate(layer_idx)
        self.groups, eps = config.o_groups, config.rms_norm_eps
        self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=False)
        self.q_a_norm = Float32RMSNorm(config.q_lora_rank, eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, H * Dh, bias=False)
        self.kv_proj = nn.Linear(D, Dh, bias=False)
        self.kv_norm = Float32RMSNorm(Dh, eps)
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
        self.eps, self.scale, self.layer_idx = eps, Dh ** -0.5, layer_idx

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ropes: dict,
                cache: CompressedCache | None = None, attn_impl: str = "naive") -> torch.Tensor:
        """x [B, T, D] at positions [B, T] (0..T-1 without a cache; the cache's next T with one), ropes:
        "main" and "compress" (cos, sin) [B, T, R/2] at those positions, "rotary" the compressed table
        (for entries) -> [B, T, D]. attn_impl (V4_ATTN_IMPLS): CSA layers attend their selected entries
        through a mask over all of them (`naive`, the reference) or gathered (`sparse`: k entries per query
        instead of N, what matters at long context)."""
        if attn_impl not in V4_ATTN_IMPLS:
            raise ValueError(f"DeepSeek-V4 attn_impl must be one of {V4_ATTN_IMPLS}, got {attn_impl!r}")
        if isinstance(cache, CompressedCacheRows) and x.shape[1] == 1 and attn_impl == "sparse":
            return self._decode_rows(x, positions, ropes, cache)
        if isinstance(cache, CompressedCacheRows):  # rows at different lengths: each through its own cache
            return torch.cat([self.forward(x[b : b + 1], positions[b : b + 1], _row_ropes(ropes, b), row, attn_impl)
                              for b, row in enumerate(cache.rows)])
        B, T, _ = x.shape
        cos, sin = ropes["compress" if self.rate else "main"]
        hc, hs = cos[:, :, None], sin[:, :, None]  # broadcast over heads
        q_latent, q, kv = self.project(x, cos, sin)
        key_positions = positions
        if cache is not None:  # the window's earlier keys, then this forward's
            kv, key_positions = cache.extend_window(self.layer_idx, kv, positions, self.window)
        ahead = positions[:, :, None] - key_positions[:, None, :]  # [B, T, S]: query position - key position
        mask = (ahead >= 0) & (ahead < self.window)
        keys, picked = kv, None
        if self.compressor is not None:
            states = cache.states[self.layer_idx] if cache is not None else (None, None)
            store = states[0]
            if store is None:  # no cache: the entries of the whole sequence
                store = CompressorState(entries=self.compressor(x, ropes["rotary"]), rate=self.rate)
            else:
                self.compressor.update(x, ropes["rotary"], store)
            if getattr(self.compressor, "indexer", None) is not None:
                picked = self.compressor.indexer.select(x, q_latent, positions, cos, sin, ropes["rotary"], states[1])
            if picked is None or attn_impl == "naive":  # every entry, the unselected masked
                entries = store.all()  # [B, N, Dh]
                seen = entry_visible(positions, entries.shape[1], self.rate) if picked is None else \
                    mask.new_zeros(B, T, entries.shape[1]).scatter_(-1, *picked)
                keys, mask = torch.cat((kv, entries), dim=1), torch.cat((mask, seen), dim=-1)
        sparse = picked is not None and attn_impl == "sparse"  # only the selected entries are read
        taken = store.take(picked[0]) if sparse else None
        W, past = kv.shape[1], kv.shape[1] - T  # window keys (the query t's own at past + t), then entries
        out = []
        # A long chunk attends in query blocks, each over the window keys it can see (positions are contiguous):
        # T x (block + W) products instead of T x (T + W)
        step = T if T <= WINDOW_QUERY_BLOCK else WINDOW_QUERY_BLOCK
        for t0 in range(0, T, step):
            t, ks = slice(t0, t0 + step), slice(max(0, past + t0 - (self.window - 1)), min(W, past + t0 + step))
            if step == T:
                t, ks = slice(None), slice(0, W)
            if sparse:
                out.append(attend_gathered_with_sinks(q[:, t], kv[:, ks], mask[:, t, ks], taken[:, t], picked[1][:, t],
                                                      self.sinks, self.scale))
            else:
                block_keys = torch.cat((kv[:, ks], keys[:, W:]), dim=1) if step < T else keys
                block_mask = torch.cat((mask[:, t, ks], mask[:, t, W:]), dim=-1) if step < T else mask
                out.append(attend_with_sinks(q[:, t], block_keys, block_mask, self.sinks, self.scale))
        out = out[0] if len(out) == 1 else torch.cat(out, dim=1)  # [B, T, H, Dh]
        out = rope_tail(out, hc, -hs)  # values carry rope: rotate back by the query's position
        return self.o_b_proj(self._grouped_out(out))

    def project(self, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] and the layer's (cos, sin) -> (q latent [B, T, q_lora_rank], queries [B, T, H, Dh] and
        this forward's keys [B, T, Dh], both normed and rotated)."""
        B, T, _ = x.shape
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent).view(B, T, self.num_heads, self.head_dim)
        q = rope_tail(unweighted_rms_norm(q, self.eps), cos[:, :, None], sin[:, :, None])
        return q_latent, q, rope_tail(self.kv_norm(self.kv_proj(x)), cos, sin)

    def _decode_rows(self, x: torch.Tensor, positions: torch.Tensor, ropes: dict,
                     cache: CompressedCacheRows) -> torch.Tensor:
        """One new token per row (decode) over rows at different lengths, the gathered ("sparse") path batched:
        projections and the attention run over all rows at once; only what reads a row's own cache (its window,
        its compressors' update, the indexer's scan and pick) runs per row. Each row's keys are its window then
        its selected (CSA) or all (HCA) entries, padded to the longest row's and masked."""
        cos, sin = ropes["compress" if self.rate else "main"]
        hc, hs = cos[:, :, None], sin[:, :, None]
        q_latent, q, kv = self.project(x, cos, sin)  # kv [B, 1, Dh]
        keys, valid = [], []
        for b, row in enumerate(cache.rows):
            here = slice(b, b + 1)
            window, _ = row.extend_window(self.layer_idx, kv[here], positions[here], self.window)  # all visible
            parts, seen = [window[0]], [torch.ones(window.shape[1], dtype=torch.bool, device=x.device)]
            if self.compressor is not None:
                store, index_state = row.states[self.layer_idx]
                self.compressor.update(x[here], ropes["rotary"], store)
                indexer = getattr(self.compressor, "indexer", None)
                if indexer is not None:
                    picked = indexer.select(x[here], q_latent[here], positions[here], cos[here], sin[here],
                                            ropes["rotary"], index_state)
                    parts.append(store.take(picked[0])[0, 0])
                    seen.append(picked[1][0, 0])
                else:  # HCA: every entry so far is complete for the row's newest token
                    parts.append(store.all()[0])
                    seen.append(torch.ones(parts[-1].shape[0], dtype=torch.bool, device=x.device))
            keys.append(torch.cat(parts))
            valid.append(torch.cat(seen))
        keys = nn.utils.rnn.pad_sequence(keys, batch_first=True)  # [B, S, Dh], zero-padded
        mask = nn.utils.rnn.pad_sequence(valid, batch_first=True)[:, None]  # [B, 1, S]
        out = attend_with_sinks(q, keys.to(q.dtype), mask, self.sinks, self.scale)
        out = rope_tail(out, hc, -hs)
        return self.o_b_proj(self._grouped_out(out))

    def _grouped_out(self, out: torch.Tensor) -> torch.Tensor:
        """[B, T, H, Dh] -> [B, T, G * o_lora_rank]: group g's heads through its block of o_a_proj."""
        B, T = out.shape[:2]
        G = self.groups
        w = self.o_a_proj.weight.view(G, -1, self.o_a_proj.in_features)  # [G, r, H*Dh/G]
        return torch.einsum("btgi,gri->btgr", out.reshape(B, T, G, -1), w).reshape(B, T, -1)


def take_entries(entries: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """entries [B, N, d] at indices [B, T, k] -> [B, T, k, d]."""
    B, T, k = indices.shape
    d = entries.shape[-1]
    return entries.gather(1, indices.reshape(B, T * k, 1).expand(-1, -1, d)).view(B, T, k, d)


def attend_gathered_with_sinks(q: torch.Tensor, window: torch.Tensor, window_mask: torch.Tensor,
                               picked: torch.Tensor, valid: torch.Tensor, sinks: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """`attend_with_sinks` over the window keys [B, S, Dh] (window_mask [B, T, S]) and, per query, only its
    selected entries picked [B, T, k, Dh] (valid [B, T, k]: invalid picks masked): the same softmax."""
    logits = torch.cat((torch.einsum("bthd,bsd->bhts", q, window) * scale,
                        torch.einsum("bthd,btkd->bhtk", q, picked) * scale), dim=-1)
    mask = torch.cat((window_mask, valid), dim=-1)
    logits = logits.masked_fill(~mask[:, None], float("-inf")).float()
    sink = sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
    probs = torch.cat((logits, sink), dim=-1).softmax(dim=-1)[..., :-1].to(window.dtype)
    S = window.shape[1]
    return torch.einsum("bhts,bsd->bthd", probs[..., :S], window) + \
        torch.einsum("bhtk,btkd->bthd", probs[..., S:], picked)


def attend_with_sinks(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q [B, T, H, Dh], keys (= values) [B, S, Dh], mask [B, T, S] bool, sinks [H] -> [B, T, H, Dh]:
    softmax over [scale q.k (masked) ; sink_h] in float32, the sink's column dropped."""
    logits = torch.einsum("bthd,bsd->bhts", q, keys) * scale
    logits = logits.masked_fill(~mask[:, None], float("-inf")).float()
    sink = sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
    probs = torch.cat((logits, sink), dim=-1).softmax(dim=-1)[..., :-1]
    return torch.einsum("bhts,bsd->bthd", probs.to(keys.dtype), keys)


@dataclass
class CompressedCache:
    """A DeepSeek-V4 model's cache for one batch of sequences of one length (the contiguous, non-paged cache
    the model decodes with, as LatentCache is for MLA): per layer the window's last sliding_window - 1 keys,
    and per compressor (the layer's, the CSA indexer's) its CompressorState: pending incomplete block,
    overlap halves and entries. The model appends to it during a forward and calls `advance` once after its
    last layer; positions must continue at `length`."""

    num_layers: int
    length: int = 0
    windows: list = field(default_factory=list)
    states: list = field(default_factory=list)

    def __post_init__(self):
        self.windows = [None] * self.num_layers
        self.states = [(CompressorState(), CompressorState()) for _ in range(self.num_layers)]

    @classmethod
    def for_model(cls, config: ModelConfig) -> CompressedCache:
        return cls(config.num_hidden_layers)

    def extend_window(self, layer_idx: int, kv: torch.Tensor, positions: torch.Tensor,
                      window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This forward's keys kv [B, T, Dh] at positions [B, T] -> (the window's earlier keys then these,
        their positions [B, S]); keeps the last window - 1 for the next forward."""
        past = self.windows[layer_idx]
        key_positions = positions
        if past is not None:
            kv = torch.cat((past, kv), dim=1)
            key_positions = torch.cat((positions[:, :1] - past.shape[1] + torch.arange(
                past.shape[1], device=kv.device), positions), dim=1)
        self.windows[layer_idx] = kv[:, max(0, kv.shape[1] - (window - 1)):]
        return kv, key_positions

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


@dataclass
class CompressedCacheRows:
    """A batch whose rows stand at different lengths (an engine's decode rows), one CompressedCache (or a paged
    one) per row: each layer's attention runs row by row through its row's cache, the rest of the model batched.
    Row b's positions must continue rows[b].length."""

    rows: list

    def advance(self, num_tokens: int) -> None:
        for row in self.rows:
            row.advance(num_tokens)


def _row_ropes(ropes: dict, b: int) -> dict:
    return {name: (v if name == "rotary" else (v[0][b : b + 1], v[1][b : b + 1])) for name, v in ropes.items()}
