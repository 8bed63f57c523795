"""Turns a step's plan into tensors, runs the model over the paged cache, returns next-token logits.

Rows that add few tokens over a long context (decode, the tail of a prefix-cache hit) run together
through absorbed MLA, which attends over the cached latent without expanding it; long prompt chunks run
together through the naive path (expanded K/V and SDPA, compute-bound). A per-row cost model picks.
Each group is padded to its longest row; padding never reaches the cache. With `compile`, decode-only
groups of up to COMPILED_DECODE_MAX_TOKENS new tokens (rows of a token and its drafts, all of one width)
run through the compiled decode step (engine/compiled.py), its arguments built from Python lists
(KVPool.decode_args: a few new tokens); larger decode batches amortise eager dispatch over their rows
anyway. With `fused_draft` (MTP speculation) the compiled step also verifies greedily and runs the first
MTP draft step (StepOutput.drafts).

Shape legend: B rows, T new tokens per row (padded), V vocab.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

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
        # DeepSeek-V3.2 compiles too: the compiled step carries the indexer keys, and the in-place indexer scan
        # is an opaque op in its graph (engine/compiled.py: DecodeView)
        # DeepSeek-V4 (compressed caches, engine/v4_cache.py) decodes eagerly: per-row caches, attention row by row
        compile = compile and not model.config.is_v4
        if compile:
            from openr2.quant.layers import quant_schemes

            if quant_schemes(model) - {"int8"}:  # int4 / fp8 unpacking compiles into slower kernels than eager
                warnings.warn("compile: int4 and fp8 models decode eagerly (only float and int8 are compiled)",
                              stacklevel=2)
            else:
                from openr2.engine.compiled import compiled_decode_step

                self._compiled_decode = compiled_decode_step(model, compile_cache_dir)
                self.prune_compiled()

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
        position to draft from) rows: writes its keys at those positions (the pool's layer L + depth);
        returns the draft logits at the indexed position [B, V] and the block output there [B, D] (a
        chained step's hidden). Transformer.draft_at: the rest of the block runs at that position only.
        Compiled: rows of up to COMPILED_DECODE_MAX_WIDTH positions in one compiled call; longer ones
        (prompts) write the keys before the indexed position eagerly and draft there through the compiled
        one-position step (the positions past it are fillers of rejected drafts: not written)."""
        T = max(len(r[3]) for r in rows)
        B, D = len(rows), rows[0][2].shape[-1]
        # (not with an indexer, V3.2: draft_at runs its MTP block at every position, writing its indexer keys too)
        if self._compiled_decode is not None and T > COMPILED_DECODE_MAX_WIDTH and B <= COMPILED_DECODE_MAX_TOKENS \
                and not self.model.config.has_indexer:
            # long rows (prompts): the keys of the positions before the drafting one eagerly, then the
            # drafting position through the compiled one-token step (past it: fillers, to be overwritten)
            keys = [(seq, start, h[:i], ids[:i]) for seq, start, h, ids, i in rows if i > 0]
            if keys:
                self._mtp_keys(keys, depth)
            return self.draft([(seq, start + i, h[i : i + 1], ids[i : i + 1], 0) for seq, start, h, ids, i in rows],
                              depth)
        last = torch.tensor([r[4] for r in rows], device=self.device)
        if self._compiled_decode is not None and T <= COMPILED_DECODE_MAX_WIDTH \
                and B * T <= COMPILED_DECODE_MAX_TOKENS and all(len(r[3]) == T for r in rows):
            from openr2.engine.compiled import compiled_draft_step

            hidden = torch.stack([r[2] for r in rows])
            ids, positions = [], []
            for _, start, _, next_ids, _ in rows:
                ids += next_ids
                positions += range(start, start + T)
            *cache, block_size = self.pool.decode_args([r[0].block_table for r in rows], [r[1] for r in rows], T)
            logits, h = compiled_draft_step(self.model, depth, self.compile_cache_dir)(
                hidden, torch.tensor(ids, device=self.device).view(B, T),
                torch.tensor(positions, device=self.device).view(B, T), *cache, last, *self.pool.index_args(),
                block_size=block_size)
            return logits.float(), h
        hidden = torch.zeros(B, T, D, dtype=self.model.dtype, device=self.device)
        ids, positions = [], []
        for b, (_, start, h, next_ids, _) in enumerate(rows):
            n = len(next_ids)
            hidden[b, :n] = h
            ids.append(next_ids + [0] * (T - n))
            positions.append(list(range(start, start + n)) + [start + n - 1] * (T - n))
        ids, positions = torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device)
        view = self.pool.view([r[0].block_table for r in rows], [r[1] for r in rows], [len(r[3]) for r in rows])
        logits, h = self.model.draft_at(hidden, ids, positions, view, last, depth)
        return logits.float(), h

    def _mtp_keys(self, rows: list[tuple[Sequence, int, torch.Tensor, list[int]]], depth: int) -> None:
        """The keys of MTP module `depth` over (sequence, first position, hidden [n, D], next token ids [n])
        rows, eagerly (Transformer.mtp_keys)."""
        T = max(len(r[3]) for r in rows)
        hidden = torch.zeros(len(rows), T, rows[0][2].shape[-1], dtype=self.model.dtype, device=self.device)
        ids, positions = [], []
        for b, (_, start, h, next_ids) in enumerate(rows):
            n = len(next_ids)
            hidden[b, :n] = h
            ids.append(next_ids + [0] * (T - n))
            positions.append(list(range(start, start + n)) + [start + n - 1] * (T - n))
        view = self.pool.view([r[0].block_table for r in rows], [r[1] for r in rows], [len(r[3]) for r in rows])
        self.model.mtp_keys(hidden, torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                            view, depth)

    def max_drafts(self, num_rows: int) -> int | None:
        """The most drafts per row that keep a decode step of num_rows rows compiled (None: no limit, the
        step is eager anyway)."""
        if self._compiled_decode is None or num_rows > COMPILED_DECODE_MAX_TOKENS:
            return None
        return min(COMPILED_DECODE_MAX_WIDTH, COMPILED_DECODE_MAX_TOKENS // num_rows) - 1

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
        # the compiled step: every row T tokens (one, or one and its drafts), each to be sampled
        if self._compiled_decode is not None and attn_impl == "absorbed" and T <= COMPILED_DECODE_MAX_WIDTH \
                and len(group) * T <= COMPILED_DECODE_MAX_TOKENS \
                and all(n == T == 1 + len(seq.draft_token_ids) and seq.num_computed == seq.num_tokens - 1
                        for seq, n in group):
            return self._forward_compiled(group, T, with_hidden, out)
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
        ids, positions = torch.tensor(rows, device=self.device), torch.tensor(row_positions, device=self.device)
        view = self.pool.view([s.block_table for s, _ in group], [s.num_computed for s, _ in group],
                              [n for _, n in group])
        index = (torch.tensor(logit_rows, dtype=torch.long, device=self.device),
                 torch.tensor(logit_cols, dtype=torch.long, device=self.device))
        logits, hidden = self.model(ids, positions, cache=view, attn_impl=attn_impl, logits_index=index,
                                    return_hidden=True)
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

    def prepare(self, shapes: list[tuple[str, int]], max_rows: int) -> None:
        """Load (or build) now the compiled steps' packages for `shapes`, (step, new tokens per row) pairs, where
        step is "decode", "decode-draft" or "draft-<depth>" (engine/compiled.py), for every row count from 1 to
        max_rows that keeps a step within COMPILED_DECODE_MAX_TOKENS: a speculative engine's warm-up
        (Speculator.compiled_shapes), so that its first requests do not build them. The steps run on stand-in
        inputs whose writes land in block 0 of the pool: call it on an idle engine (its prefix cache reset)."""
        if self._compiled_decode is None:
            return
        from openr2.engine import compiled

        names = {"decode": compiled.compiled_decode_step, "decode-draft": compiled.compiled_decode_draft_step}
        bs, D = self.pool.block_size, self.model.config.hidden_size
        for name, width in shapes:
            if name in names:
                step = names[name](self.model, self.compile_cache_dir)
            else:
                step = compiled.compiled_draft_step(self.model, int(name.removeprefix("draft-")), self.compile_cache_dir)
            top = min(max_rows, COMPILED_DECODE_MAX_TOKENS // width)
            rows = 1
            while rows is not None:
                *cache, block_size = self.pool.decode_args([[0]] * rows, [0] * rows, width)
                ids = torch.zeros(rows, width, dtype=torch.long, device=self.device)
                positions = torch.arange(width, device=self.device).expand(rows, width).contiguous()
                if name in names:
                    args = (ids, positions, *cache, *self.pool.index_args())
                else:
                    hidden = torch.zeros(rows, width, D, dtype=self.model.dtype, device=self.device)
                    last = torch.zeros(rows, dtype=torch.long, device=self.device)
                    args = (hidden, ids, positions, *cache, last, *self.pool.index_args())
                with torch.inference_mode():
                    step(*args, block_size=block_size)
                rows = next((r for r in range(rows + 1, top + 1) if not step.covers(r, width, bs)), None)

    def prune_compiled(self) -> None:
        """Keep the compiled steps' directory within its cap (engine/compile_cache.py), the packages this
        model's steps run with marked as just used and kept; a failure to prune only warns."""
        if self._compiled_decode is None:
            return
        from openr2.engine import compile_cache, compiled

        steps = compiled._COMPILED.get(self.model, {}).values()  # the model's compiled steps, by name
        in_use = [p.path for step in steps for ps in step._packages.values() for p in ps if p.path]
        try:
            compile_cache.touch(in_use)
            compile_cache.prune(self.compile_cache_dir or compiled.default_cache_dir(), keep=in_use)
        except (OSError, ValueError) as e:
            warnings.warn(f"compiled steps not pruned ({type(e).__name__}: {e})", stacklevel=2)

    def _decode_step(self):
        if self.fused_draft:
            from openr2.engine.compiled import compiled_decode_draft_step

            return compiled_decode_draft_step(self.model, self.compile_cache_dir)
        return self._compiled_decode

    def _forward_compiled(self, group: list[tuple[Sequence, int]], T: int, with_hidden: bool, out: StepOutput):
        """Rows of T tokens each, all to be sampled, through the compiled decode step (with fused_draft, the
        decode step fused with the first MTP draft step)."""
        B = len(group)
        ids, positions = [], []
        for seq, n in group:
            ids += seq.next_token_ids(n)
            positions += range(seq.num_computed, seq.num_computed + n)
        cache = self.pool.decode_args([seq.block_table for seq, _ in group], [seq.num_computed for seq, _ in group], T)
        ids = torch.tensor(ids, device=self.device).view(B, T)
        positions = torch.tensor(positions, device=self.device).view(B, T)
        logits, hidden, *fused = self._decode_compiled(ids, positions, cache)
        logits = logits.float()
        # the argmax of every position, for greedy rows (the fused step found it already): one host sync
        next_ids = (fused[0] if fused else logits.argmax(-1)).tolist()
        for b, (seq, _) in enumerate(group):
            out.logits[seq.seq_id] = logits[b]
            out.argmax[seq.seq_id] = next_ids[b]
            if with_hidden:
                out.hidden[seq.seq_id] = hidden[b]
        if fused:  # the first MTP draft step ran inside the same call
            accepted, drafts = fused[1].tolist(), fused[2].tolist()
            for b, (seq, _) in enumerate(group):
                out.drafts[seq.seq_id] = FusedDraft(next_ids[b], accepted[b], drafts[b], fused[3], b)

    def _decode_compiled(self, ids, positions, cache: tuple):
        *tensors, block_size = cache
        try:
            return self._decode_step()(ids, positions, *tensors, *self.pool.index_args(), block_size=block_size)
        except Exception as e:  # compilation fails in many exception types; eager is the reference
            # A model torch.compile cannot take whole (for example a layer type it cannot trace): run eager.
            warnings.warn(f"compiled decode unavailable, running eager: {type(e).__name__}: {str(e)[:200]}",
                          stacklevel=2)
            self._compiled_decode = None
            from openr2.engine.compiled import decode_draft_step, decode_step

            step = decode_draft_step if self.fused_draft else decode_step
            return step(self.model, ids, positions, *tensors, block_size=block_size, pool_k=self.pool.k_index)


class FusedDraft(NamedTuple):
    """What the decode step fused with the first MTP draft step found for one row (compiled.decode_draft_step):
    the argmax next token of each new position, how many leading drafts equal them, the MTP's draft at
    the last committed position (`accepted`: right for a row whose committed tokens are the argmax ones) and
    its block output there, row `row` of `hidden` [B, D]."""

    next_ids: list[int]
    accepted: int
    draft: int
    hidden: torch.Tensor
    row: int


@dataclass
class StepOutput:
    logits: dict[int, torch.Tensor]  # seq_id -> [1 + drafts, V] float32, for rows that reached their end
    hidden: dict[int, torch.Tensor]  # seq_id -> [new tokens, D], when asked
    drafts: dict[int, FusedDraft] = field(default_factory=dict)  # with fused_draft: compiled rows
    argmax: dict[int, list[int]] = field(default_factory=dict)  # seq_id -> argmax token of each logits row, if known
