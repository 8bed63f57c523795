"""Paged attention: which way of reading the paged latent pool should absorbed MLA take, measured side by side?

One layer's absorbed attention of small_moe's shape (8 heads, kv_lora_rank 64, rope 16, float32) for rows of
one new token over contexts of 4K..128K keys in blocks of 64, the candidates engine/paged_attention.py chose
between:
  gather       each row's context copied out of the pool through its block table, then bmm (the reference;
               what the engine did before);
  copy only    the gather's copy alone (what the in-place read saves);
  inductor     torch.compile of the read written as reductions over indirect loads (the gather fused into
               the products: no copy, but no matmul either);
  views        each row's keys as a view of the pool and MKL mm, only possible where a row's blocks lie
               contiguously (here they are allocated so; a per-row Python loop, eager only);
  kernel       openr2::paged_latent_attention, blocks in shuffled pool order (the engine's case);
  kernel contig  the same kernel, blocks contiguous (what block order costs it).
Every candidate's output is checked against the gather's before timing.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/paged_attention.py [--runs 9 --batch 1]
Prints a table (ms per call, median) and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from bench.common import time_rows  # noqa: E402
from openr2.engine import paged_attention  # noqa: E402

H, C, R, BLOCK = 8, 64, 16, 64


def inductor_read(q, qr, pool_c, pool_r, slots, scale):
    """Scores and values as reductions over indirect loads (pool rows picked by `slots` inside the loops)."""
    kc, kr = pool_c[slots], pool_r[slots]  # [B, S, .]: indexing that inductor fuses into the reductions
    s = ((kc[:, :, None, :] * q[:, None]).sum(-1) + (kr[:, :, None, :] * qr[:, None]).sum(-1)) * scale  # [B, S, Q]
    p = torch.softmax(s, dim=1)
    return (p[:, :, :, None] * kc[:, :, None, :]).sum(1)  # [B, Q, C]


def views_read(q, qr, pool_c, pool_r, starts, num_keys, scale):
    """Each row's keys a view (its blocks contiguous from slot starts[b]); mm, softmax, mm."""
    out = []
    for b, start in enumerate(starts):
        kc, kr = pool_c[start : start + num_keys], pool_r[start : start + num_keys]
        s = torch.addmm(torch.mm(q[b], kc.t()), qr[b], kr.t(), alpha=scale, beta=scale)
        out.append(torch.mm(s.softmax(-1), kc))
    return torch.stack(out)


def _candidates(S: int, B: int, gen, inductor) -> dict:
    """The candidates' calls for B rows of S keys, each checked against the gather's output."""
    nblk = S // BLOCK
    pool_c = torch.randn(1, B * nblk * BLOCK, C, generator=gen)
    pool_r = torch.randn(1, B * nblk * BLOCK, R, generator=gen)
    shuffled = torch.randperm(B * nblk, generator=gen).view(B, nblk)
    contiguous = torch.arange(B * nblk).view(B, nblk)
    q, qr = torch.randn(B, 1, H, C, generator=gen), torch.randn(B, 1, H, R, generator=gen)
    positions = torch.full((B, 1), S - 1)
    scale = (C + R) ** -0.5
    slots = paged_attention.block_slots(shuffled, BLOCK, S)
    starts = [b * nblk * BLOCK for b in range(B)]

    def kernel(table):
        return paged_attention.paged_latent_attention(q, qr, pool_c, pool_r, 0, table, positions, BLOCK, scale)

    def gather(table):
        return paged_attention.gather_latent_attention(q, qr, pool_c, pool_r, 0, table, positions, BLOCK, scale)

    candidates = {
        "gather": lambda: gather(shuffled),
        "copy only": lambda: (pool_c[0][slots], pool_r[0][slots]),
        "inductor": lambda: inductor(q.view(B, H, C), qr.view(B, H, R), pool_c[0], pool_r[0], slots, scale),
        "views": lambda: views_read(q.view(B, H, C), qr.view(B, H, R), pool_c[0], pool_r[0], starts, S, scale),
        "kernel": lambda: kernel(shuffled),
        "kernel contig": lambda: kernel(contiguous),
    }
    want, want_contig = gather(shuffled).view(B, H, C), gather(contiguous).view(B, H, C)
    for name, fn in candidates.items():
        if name != "copy only":
            ref = want_contig if name in ("views", "kernel contig") else want
            err = (fn().view(B, H, C) - ref).abs().max().item()
            assert err < 1e-4, f"{name} differs from the gather by {err:.3g} at {S}"
    return candidates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    args = ap.parse_args()
    if not paged_attention.load():
        raise SystemExit("the paged attention kernel could not be built")
    B, gen = args.batch, torch.Generator().manual_seed(0)
    print(f"# paged attention candidates: one layer, H {H}, C {C}, R {R}, float32, blocks of {BLOCK}, batch {B}, "
          f"one new token per row; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, runs {args.runs} (median)")
    inductor = torch.compile(inductor_read, dynamic=True)
    table_rows, result = [], []
    for S in args.contexts:
        candidates = _candidates(S, B, gen, inductor)
        times, _ = time_rows(candidates, args.runs, warmup=1)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        attended_mb = B * S * (C + R) * 4 / 1e6
        table_rows.append((S, attended_mb, med))
        result.append({"context": S, "attended_mb": attended_mb, **{k: round(v, 3) for k, v in med.items()}})
    names = list(table_rows[0][2])
    print("| context | attended MB | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for S, mb, med in table_rows:
        print(f"| {S:,} | {mb:.1f} | " + " | ".join(f"{med[n]:.2f}" for n in names) + " |")
    print(json.dumps({"bench": "paged_attention", "batch": B, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "rows": result}))


if __name__ == "__main__":
    main()
