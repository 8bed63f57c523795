"""The sparse-attention selection's top-k: model/topk.py's exact two-stage top_k_indices vs one torch.topk,
on one row of N random float32 scores (a decode step's indexer scores), interleaved A/B rounds in this
process's CPU time (one thread: what other processes' load disturbs least).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/topk.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench.common import cpu_name
from openr2.model.topk import top_k_indices


def cpu_ms(fn, reps: int) -> float:
    start = time.process_time()
    for _ in range(reps):
        fn()
    return 1e3 * (time.process_time() - start) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16384,65536,262144,1048576")
    ap.add_argument("--ks", default="128,512,2048")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# {cpu_name()}, torch {torch.__version__}, 1 thread, CPU ms per row (median / best of {args.rounds} "
          f"interleaved rounds), load {os.getloadavg()[0]:.1f}")
    print(f"{'N':>8} {'k':>5} {'torch.topk':>16} {'two-stage':>16} {'speed-up (median)':>18}")
    gen = torch.Generator().manual_seed(0)
    for n in (int(s) for s in args.sizes.split(",")):
        for k in (int(s) for s in args.ks.split(",")):
            if k >= n:
                continue
            x = torch.randn(1, 1, n, generator=gen)
            assert torch.equal(x.gather(-1, top_k_indices(x, k)), x.topk(k, dim=-1).values)
            reps = max(1, 2_000_000 // n)
            a, b = [], []
            for _ in range(args.rounds):
                a.append(cpu_ms(lambda x=x, k=k: x.topk(k, dim=-1), reps))
                b.append(cpu_ms(lambda x=x, k=k: top_k_indices(x, k), reps))
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"{n:>8} {k:>5} {ma:>8.3f} / {min(a):<6.3f} {mb:>8.3f} / {min(b):<6.3f} {ma / mb:>18.2f}", flush=True)


if __name__ == "__main__":
    main()
