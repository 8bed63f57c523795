"""DeepSeek-V4 decode rows: batched against one by one (issue 18).

B rows, one new token each at context S, over the engine's paged V4 cache (random values, shuffled 512-token
blocks), the bench model of bench/longctx.py --v4. Rows, interleaved in one run:
  batched     the engine's path: CompressedAttention._decode_rows (projections and attention over all rows at
              once, each row's window and selected / HCA entries padded and masked; only the cache reads per row);
  row_by_row  every attention layer runs each row through its own cache, as it did before (the rest of the model
              batched in both).
Prints median and best ms per step, the ratio, the logits' largest difference, and a final JSON line.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/v4_rows.py [--rows 8 --context 4096 --runs 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from bench.common import cpu_name, time_rows  # noqa: E402
from bench.longctx import v4_config  # noqa: E402
from openr2.engine.v4_cache import V4Pool  # noqa: E402
from openr2.model.compressed import CompressedAttention, CompressedCacheRows, _row_ropes  # noqa: E402
from openr2.model.transformer import build_model  # noqa: E402

BLOCK = 512


def row_by_row(self, x, positions, ropes, cache):
    return torch.cat([self.forward(x[b : b + 1], positions[b : b + 1], _row_ropes(ropes, b), row, "sparse")
                      for b, row in enumerate(cache.rows)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    cfg, B, S = v4_config(), args.rows, args.context
    if S % BLOCK:
        raise SystemExit(f"--context must be a multiple of {BLOCK} (a block boundary: the step writes nothing)")
    model = build_model(cfg, seed=0).eval()
    per_row = S // BLOCK + 1
    pool = V4Pool(cfg, B * per_row, BLOCK)
    gen = torch.Generator().manual_seed(0)
    for t in (pool.window, *pool.entries.values(), *pool.index_entries.values(),
              *(h for pair in pool.halves.values() for h in pair)):
        t.normal_(generator=gen)
    order = torch.randperm(pool.num_blocks, generator=gen).tolist()
    tables = [order[b * per_row : (b + 1) * per_row] for b in range(B)]
    ids, positions = torch.full((B, 1), 7), torch.full((B, 1), S)
    batched = CompressedAttention._decode_rows

    def step(decode_rows):
        def run():
            CompressedAttention._decode_rows = decode_rows
            try:
                with torch.inference_mode():
                    rows = CompressedCacheRows([pool.row_cache(t, S, None) for t in tables])
                    return model(ids, positions, cache=rows, attn_impl="sparse")
            finally:
                CompressedAttention._decode_rows = batched
        return run

    diff = (step(batched)() - step(row_by_row)()).abs().max().item()
    times, other = time_rows({"batched": step(batched), "row_by_row": step(row_by_row)}, args.runs, warmup=2)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    best = {k: 1e3 * min(v) for k, v in times.items()}
    load = os.getloadavg()[0]
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, load {load:.1f}")
    print(f"{B} rows at {S}: batched {ms['batched']:.2f} ms (best {best['batched']:.2f}), row by row "
          f"{ms['row_by_row']:.2f} ms (best {best['row_by_row']:.2f}): {ms['row_by_row'] / ms['batched']:.2f}x "
          f"(best {best['row_by_row'] / best['batched']:.2f}x); logits max diff {diff:.2g}")
    print(json.dumps({"rows": B, "context": S, "ms": ms, "best_ms": best, "max_logit_diff": diff,
                      "other_processes": other, "load_avg_1m": load}))


if __name__ == "__main__":
    main()
