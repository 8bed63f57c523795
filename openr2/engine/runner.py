"""Turns a step's plan into tensors, runs the model over the paged cache, returns next-token logits.

Rows that add few tokens over a long context (decode, the tail of a prefix-cache hit) run together
through absorbed MLA, which attends over the cached latent without expanding it; long prompt chunks run
together through the naive path (expanded K/V and SDPA, compute-bound). A per-row cost model picks.
Each group is padded to its longest row; padding never reaches the cache. With `compile`, decode-only
groups of up to COMPILED_DECODE_MAX_TOKENS rows run through the compiled decode step (engine/compiled.py);
larger decode batches amortise eager dispatch over their rows anyway.

Shape legend: B rows, T new tokens per row (padded), V vocab.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from openr2.engine.compiled import COMPILED_DECODE_MAX_TOKENS, COMPILED_DECODE_MAX_WIDTH
from openr2.engine.kv_cache import KVPool
from openr2.engine.sequence import Sequence
from openr2.model.transformer import Transformer


class ModelRunner:
    def __init__(self, model: Transformer, pool: KVPool, compile: bool = False, compile_cache_dir: str | None = None):
        self.model, self.pool, self.compile_cache_dir = model, pool, compile_cache_dir
        self.fused_draft = False  # compiled decode rows also run the first MTP draft step (engine sets it)
        self.device = model.device
        self._compiled_decode = None
        # DeepSeek-V3.2 (sparse attention: the indexer's scores and top-k, the selected latents' gather) runs
        # its decode steps eagerly: the compiled step (engine/compiled.py) carries the dense latent cache only
        # DeepSeek-V4 (compressed caches, engine/v4_cache.py) likewise: per-row caches, attention row by row
        compile = compile and not model.config.has_indexer and not model.config.is_v4
        if compile:
            from openr2.quant.layers import quant_schemes

            if quant_schemes(model) - {"int8"}:  # int4 / fp8 unpacking compiles into slower kernels than eager
                warnings.warn("compile: int4 and fp8 models decode eagerly (only float and int8 are compiled)",
                              stacklevel=2)
            else:
                from openr2.engine.compiled import compiled_decode_step

                self._compiled_decode = compiled_decode_step(model, compile_cache_dir)

    @torch.inference_mode()
    def run(self, plan: list[tuple[Sequence, int]], with_hidden: bool = False) -> StepOutput:
        """Forward every planned (sequence, new tokens) row: its uncomputed tokens, then its drafts.

        A row that reaches its last token gets logits (float32) at that token and at each draft, [1 + k, V];
        with_hidden, every row gets the final-normed hidden of its new positions [n, D]."""
        out = StepOutput({}, {})
        if self.model.config.is_v4:  # one-token rows (decode) in one forward, longer chunks a row each
            singles = [(seq, n) for seq, n in plan if n == 1]
            for group in ([singles] if len(singles) > 1 else [[row] for row in singles]) + \
                    [[(seq, n)] for seq, n in plan if n > 1]:
                self._forward_v4(group, with_hidden, out)
            return out
        groups: dict[str, list] = {"absorbed": [], "naive": []}
        for seq, n in plan:
            groups[self._attn_impl(n, seq.num_computed + n)].append((seq, n))
        for attn_impl, group in groups.items():
            if group:
                self._forward(group, attn_impl, with_hidden, out)
        return out

    @torch.inference_mode()
    def draft(self, rows: list[tuple[Sequence, int, torch.Tensor, list[int], int]], depth: int = 0) -> tuple:
        """MTP module `depth` over (sequence, first position, hidden [n, D], next token ids [n], index of the
        position to draft from) rows: writes its cache at those positions (the pool's layer L + depth);
        returns the draft logits there [B, V] and the block output there [B, D] (a chained step's hidden)."""
        T = max(len(r[3]) for r in rows)
        B, D = len(rows), rows[0][2].shape[-1]
        hidden = torch.zeros(B, T, D, dtype=self.model.dtype, device=self.device)
        ids, positions = [], []
        for b, (_, start, h, next_ids, _) in enumerate(rows):
            n = len(next_ids)
            hidden[b, :n] = h
            ids.append(next_ids + [0] * (T - n))
            positions.append(list(range(start, start + n)) + [start + n - 1] * (T - n))
        last = torch.tensor([r[4] for r in rows], device=self.device)
        ids, positions = torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device)
        view = self.pool.view([r[0].block_table for r in rows], [r[1] for r in rows], [len(r[3]) for r in rows])
        uniform = all(len(r[3]) == T for r in rows)
        if self._compiled_decode is not None and uniform and T <= COMPILED_DECODE_MAX_WIDTH \
                and B * T <= COMPILED_DECODE_MAX_TOKENS:
            from openr2.engine.compiled import compiled_draft_step

            *cache, block_size = view.decode_args()
            logits, h = compiled_draft_step(self.model, depth, self.compile_cache_dir)(
                hidden, ids, positions, *cache, last, block_size=block_size)
        else:
            attn_impl = "absorbed" if T <= COMPILED_DECODE_MAX_WIDTH else "naive"
            logits, h = self.model.draft(hidden, ids, positions, view, depth, last, attn_impl)
            h = h[torch.arange(B, device=self.device), last]
        return logits.float(), h

    def _attn_impl(self, num_new: int, context: int) -> str:
        """The cheaper MLA path for num_new queries over `context` keys, per head, in multiply-adds.

        naive expands every key and value from the latent (context x C x (N + V)) and then attends in
        N + R + V dims; absorbed attends over the latent itself in C + R + C dims. Few queries over a long
        context (decode, a prefix-cache hit) favour absorbed; long prompt chunks favour naive.
        """
        c = self.model.config
        C, N, R, V = c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        naive = context * C * (N + V) + num_new * context * (N + R + V)
        # DeepSeek-V3.2: absorbed attends over each query's index_topk selected keys only (the naive path
        # applies the selection as a mask over the whole context); the indexer's scan is the same for both
        attended = min(context, c.index_topk) if c.has_indexer else context
        absorbed = num_new * attended * (2 * C + R) + num_new * C * (N + V)
        return "absorbed" if absorbed < naive else "naive"

    def _forward(self, group: list[tuple[Sequence, int]], attn_impl: str, with_hidden: bool, out: StepOutput):
        T = max(n for _, n in group)
        rows, row_positions = [], []  # built as lists, one tensor each: a decode step is too short for more
        logit_rows, logit_cols, sampled = [], [], []
        for b, (seq, n) in enumerate(group):
            start = seq.num_computed
            rows.append(seq.next_token_ids(n) + [0] * (T - n))
            # padding queries see the row's context and are dropped
            row_positions.append(list(range(start, start + n)) + [start + n - 1] * (T - n))
            if start + n == seq.num_tokens + len(seq.draft_token_ids):  # reaches its end: sample
                m = 1 + len(seq.draft_token_ids)
                logit_rows += [b] * m
                logit_cols += range(n - m, n)
                sampled.append((seq, m))
        ids, positions = torch.tensor(rows), torch.tensor(row_positions)
        view = self.pool.view([s.block_table for s, _ in group], [s.num_computed for s, _ in group],
                              [n for _, n in group])
        # the compiled step: every row T tokens (one, or one and its drafts), each to be sampled
        uniform = len(logit_rows) == len(group) * T and all(n == T for _, n in group)
        if self._compiled_decode is not None and uniform and attn_impl == "absorbed" \
                and T <= COMPILED_DECODE_MAX_WIDTH and len(group) * T <= COMPILED_DECODE_MAX_TOKENS:
            logits, hidden, *fused = self._decode_compiled(ids.to(self.device), positions.to(self.device), view)
            logits = logits.flatten(0, 1)
            if fused:  # the first MTP draft step ran inside the same call
                next_ids, draft_ids, draft_hidden = fused[0].tolist(), fused[1].tolist(), fused[2]
                for b, (seq, _) in enumerate(group):
                    out.drafts[seq.seq_id] = (next_ids[b], draft_ids[b], draft_hidden[b])
        else:
            index = (torch.tensor(logit_rows, dtype=torch.long, device=self.device),
                     torch.tensor(logit_cols, dtype=torch.long, device=self.device))
            logits, hidden = self.model(ids.to(self.device), positions.to(self.device), cache=view,
                                        attn_impl=attn_impl, logits_index=index, return_hidden=True)
        logits = logits.float()
        i = 0
        for seq, m in sampled:
            out.logits[seq.seq_id] = logits[i : i + m]
            i += m
        if with_hidden:
            for b, (seq, n) in enumerate(group):
                out.hidden[seq.seq_id] = hidden[b, :n]

    def _forward_v4(self, group: list[tuple[Sequence, int]], with_hidden: bool, out: StepOutput) -> None:
        """DeepSeek-V4 rows of n tokens each (one n per group) through their V4RowCaches, CSA layers gathering
        their selected entries; several rows go as CompressedCacheRows (attention row by row)."""
        from openr2.model.compressed import CompressedCacheRows

        n = group[0][1]
        caches, ids, positions, rows, cols, sampled = [], [], [], [], [], []
        for b, (seq, _) in enumerate(group):
            start = seq.num_computed
            state = seq.cache_state if seq.cache_state is not None and seq.cache_state.length == start else None
            caches.append(self.pool.row_cache(seq.block_table, start, state))
            ids.append(seq.next_token_ids(n))
            positions.append(list(range(start, start + n)))
            if start + n == seq.num_tokens + len(seq.draft_token_ids):  # reaches its end: sample
                m = 1 + len(seq.draft_token_ids)
                rows += [b] * m
                cols += range(n - m, n)
                sampled.append((seq, m))
        cache = caches[0] if len(caches) == 1 else CompressedCacheRows(caches)
        index = (torch.tensor(rows, dtype=torch.long, device=self.device),
                 torch.tensor(cols, dtype=torch.long, device=self.device))
        logits, hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                                    cache=cache, attn_impl="sparse", logits_index=index, return_hidden=True)
        logits = logits.float()
        i = 0
        for seq, m in sampled:
            out.logits[seq.seq_id] = logits[i : i + m]
            i += m
        for b, (seq, _) in enumerate(group):
            seq.cache_state = caches[b].row_state()
            if with_hidden:
                out.hidden[seq.seq_id] = hidden[b]

    def uncompiled_rows(self, max_rows: int) -> int | None:
        """The fewest one-token decode rows (1..max_rows) the compiled step would still have to compile (or load)
        for; None when there are none, or nothing is compiled (LLMEngine.warm_up runs such batches)."""
        if self._compiled_decode is None:
            return None
        step, block_size = self._decode_step(), self.pool.block_size
        return next((rows for rows in range(1, max_rows + 1) if not step.covers(rows, 1, block_size)), None)

    def _decode_step(self):
        if self.fused_draft:
            from openr2.engine.compiled import compiled_decode_draft_step

            return compiled_decode_draft_step(self.model, self.compile_cache_dir)
        return self._compiled_decode

    def _decode_compiled(self, ids, positions, view):
        try:
            *cache, block_size = view.decode_args()
            return self._decode_step()(ids, positions, *cache, block_size=block_size)
        except Exception as e:  # compilation fails in many exception types; eager is the reference
            # A model torch.compile cannot take whole (for example a layer type it cannot trace): run eager.
            warnings.warn(f"compiled decode unavailable, running eager: {type(e).__name__}: {str(e)[:200]}",
                          stacklevel=2)
            self._compiled_decode = None
            return self.model(ids, positions, cache=view, attn_impl="absorbed", return_hidden=True)


@dataclass
class StepOutput:
    logits: dict[int, torch.Tensor]  # seq_id -> [1 + drafts, V] float32, for rows that reached their end
    hidden: dict[int, torch.Tensor]  # seq_id -> [new tokens, D], when asked
    # with fused_draft, compiled rows: seq_id -> (argmax next token per new position, the MTP's draft there,
    # its block output [new tokens, D]) (compiled.decode_draft_step)
    drafts: dict[int, tuple] = field(default_factory=dict)
