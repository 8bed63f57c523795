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

import torch

from openr2.engine.compiled import COMPILED_DECODE_MAX_TOKENS
from openr2.engine.kv_cache import KVPool
from openr2.engine.sequence import Sequence
from openr2.model.transformer import Transformer


class ModelRunner:
    def __init__(self, model: Transformer, pool: KVPool, compile: bool = False):
        self.model, self.pool = model, pool
        self.device = model.device
        self._compiled_decode = None
        if compile:
            from openr2.quant.layers import quant_schemes

            if quant_schemes(model) - {"int8"}:  # int4 / fp8 unpacking compiles into slower kernels than eager
                warnings.warn("compile: int4 and fp8 models decode eagerly (only float and int8 are compiled)",
                              stacklevel=2)
            else:
                from openr2.engine.compiled import compiled_decode_step

                self._compiled_decode = compiled_decode_step(model)

    @torch.inference_mode()
    def run(self, plan: list[tuple[Sequence, int]]) -> dict[int, torch.Tensor]:
        """Forward every planned (sequence, new tokens) row; logits [V] (float32) for rows that need a sample."""
        groups: dict[str, list] = {"absorbed": [], "naive": []}
        for seq, n in plan:
            groups[self._attn_impl(n, seq.num_computed + n)].append((seq, n))
        logits: dict[int, torch.Tensor] = {}
        for attn_impl, group in groups.items():
            if group:
                logits.update(self._forward(group, attn_impl))
        return logits

    def _attn_impl(self, num_new: int, context: int) -> str:
        """The cheaper MLA path for num_new queries over `context` keys, per head, in multiply-adds.

        naive expands every key and value from the latent (context x C x (N + V)) and then attends in
        N + R + V dims; absorbed attends over the latent itself in C + R + C dims. Few queries over a long
        context (decode, a prefix-cache hit) favour absorbed; long prompt chunks favour naive.
        """
        c = self.model.config
        C, N, R, V = c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        naive = context * C * (N + V) + num_new * context * (N + R + V)
        absorbed = num_new * context * (2 * C + R) + num_new * C * (N + V)
        return "absorbed" if absorbed < naive else "naive"

    def _forward(self, group: list[tuple[Sequence, int]], attn_impl: str) -> dict[int, torch.Tensor]:
        T = max(n for _, n in group)
        rows, row_positions = [], []  # built as lists, one tensor each: a decode step is too short for more
        for seq, n in group:
            start = seq.num_computed
            rows.append(seq.token_ids[start : start + n] + [0] * (T - n))
            # padding queries see the row's context and are dropped
            row_positions.append(list(range(start, start + n)) + [start + n - 1] * (T - n))
        ids, positions = torch.tensor(rows), torch.tensor(row_positions)
        view = self.pool.view([s.block_table for s, _ in group], [s.num_computed for s, _ in group],
                              [n for _, n in group])
        if self._compiled_decode is not None and T == 1 and attn_impl == "absorbed" and len(group) <= COMPILED_DECODE_MAX_TOKENS:
            out = self._decode_compiled(ids.to(self.device), positions.to(self.device), view)
        else:
            last = torch.tensor([n - 1 for _, n in group])
            out = self.model(ids.to(self.device), positions.to(self.device), cache=view, attn_impl=attn_impl,
                             logits_index=last.to(self.device))
        out = out.float()
        return {seq.seq_id: out[b] for b, (seq, n) in enumerate(group)
                if seq.num_computed + n == seq.num_tokens}

    def _decode_compiled(self, ids, positions, view):
        try:
            return self._compiled_decode(ids, positions, *view.decode_args())[:, 0]
        except Exception as e:  # compilation fails in many exception types; eager is the reference
            # A model torch.compile cannot take whole (for example a layer type it cannot trace): run eager.
            warnings.warn(f"compiled decode unavailable, running eager: {type(e).__name__}: {str(e)[:200]}",
                          stacklevel=2)
            self._compiled_decode = None
            return self.model(ids, positions, cache=view, attn_impl="absorbed",
                              logits_index=torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device))
