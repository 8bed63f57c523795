"""Expert parallelism's cost: step time of `--expert-parallel N` under torchrun vs one process on the same
global batch (tiny-v3 or another preset), with the all-to-all bytes a rank sends per step.

The sides cannot share a process (EP needs N of them), so the script launches itself: one process with one
torch thread, one with N threads (the same cores as EP) and torchrun with N processes of one thread each,
alternated `--rounds` times (OMP_WAIT_POLICY=PASSIVE: no spinning threads on a shared box); per side the median step time over the rounds' steps after `--warmup`. The machine's load average is
printed beside it (other jobs on a shared box move these numbers). CPU and gloo by default; on GPUs pass
--device cuda (NCCL, one GPU per rank).

    python bench/parallel.py --nproc 2 --steps 12 --rounds 2
    python bench/parallel.py --pipeline --nproc 4 --steps 8 --rounds 2   # pipeline bubble per schedule
    python bench/parallel.py --imbalance --nproc 2 --redundant 2 --skew 0.5 --steps 16 --rounds 2  # EPLB
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout: bench.parallel_pp


class RandomWindows:
    """Deterministic [B, T+1] pretraining windows (the same on every rank and in every run)."""

    def __init__(self, batch: int, seq: int, vocab: int):
        self.batch, self.seq, self.vocab, self.i = batch, seq, vocab, 0

    def __next__(self) -> torch.Tensor:
        self.i += 1
        g = torch.Generator().manual_seed(self.i)
        return torch.randint(3, self.vocab, (self.batch, self.seq + 1), generator=g)


def worker(args) -> None:
    """One side of the comparison (a plain process, or a rank of torchrun); rank 0 writes the step times."""
    from openr2.model.transformer import build_model
    from openr2.presets import get_preset
    from openr2.train import distributed
    from openr2.train.config import TrainConfig
    from openr2.train.trainer import Trainer

    dist = distributed.init(args.device)
    device = torch.device(args.device, dist.local_rank) if args.device == "cuda" else torch.device("cpu")
    torch.set_num_threads(args.threads)
    config = get_preset(args.model)
    model = build_model(config, seed=0, device=device)
    skewed = skew_router(model, args.skew) if args.skew else False
    cfg = TrainConfig(mode="pretrain", steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      warmup_steps=1, out_dir=args.out, expert_parallel=args.ep, save_every=args.steps + 1,
                      deterministic=False, device=args.device, redundant_experts=args.redundant,
                      rebalance_every=args.rebalance_every, balance_gamma=0.0 if skewed else 1e-3)
    times, last, imbalance = [], [time.perf_counter()], []

    def on_step(step, record):
        now = time.perf_counter()
        times.append((now - last[0], record.get("all_to_all_bytes", 0), record["loss"]))
        imbalance.append(record.get("ep_rows_max_over_mean"))
        last[0] = now

    trainer = Trainer(model, RandomWindows(args.batch_size, args.seq_len, config.vocab_size), cfg, on_step=on_step)
    trainer.save = lambda: None  # timing only: no checkpoint
    trainer.train()
    if dist.is_main:
        with open(os.path.join(args.out, "times.json"), "w") as f:
            json.dump(times, f)
        with open(os.path.join(args.out, "imbalance.json"), "w") as f:
            json.dump(imbalance, f)
    distributed.shutdown(dist)


def skew_router(model, skew: float) -> bool:
    """A skewed routing workload: every noaux_tc gate's correction bias set to skew * (E-1-e)/(E-1), so expert 0
    is the hottest and the load falls with the id (kept: the caller turns the bias update off). The hot
    experts then sit together on the first ranks of a contiguous placement, as correlated hot experts do."""
    from openr2.model.moe import MoE

    gates = [m.gate for m in model.modules() if isinstance(m, MoE) and hasattr(m.gate, "e_score_correction_bias")]
    for g in gates:
        E = g.e_score_correction_bias.numel()
        g.e_score_correction_bias.copy_(skew * torch.arange(E - 1, -1, -1, dtype=torch.float32) / (E - 1))
    return bool(gates)


def run_side(args, nproc: int, threads: int, out: str, redundant: int = 0) -> list:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    common = [str(Path(__file__)), "--worker", "--out", out, "--model", args.model, "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--device", args.device]
    if nproc == 1:
        cmd = [sys.executable, *common, "--threads", str(threads), "--ep", "1"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *common, "--threads", "1", "--ep", str(nproc), "--redundant", str(redundant),
               "--rebalance-every", str(args.rebalance_every), "--skew", str(args.skew)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    with open(os.path.join(out, "times.json")) as f:
        return json.load(f)


def load_imbalance(args) -> None:
    """EPLB: per-rank load imbalance (rows the ranks' experts ran, max over mean, per MoE layer and step) of
    EP=nproc runs without and with --redundant replica slots on a skewed routing workload (--skew), measured
    in the runs (all-to-all, gloo), alternated --rounds times; then the placement policy alone on DeepSeek-V3's
    shape (256 experts, 58 MoE layers, one redundant slot per rank) for Zipf-skewed loads."""
    from openr2.train.eplb import rebalance

    print(f"# EPLB load imbalance: model {args.model}, EP={args.nproc}, global batch {args.batch_size} x "
          f"{args.seq_len}, {args.steps} steps, skew {args.skew}, rebalance every {args.rebalance_every}; "
          f"load average at the start {os.getloadavg()[0]:.2f}")
    sides = {0: [], args.redundant: []}
    times = {0: [], args.redundant: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for red in sides:
                out = os.path.join(tmp, f"eplb-{red}-{r}")
                times[red] += [t for t, _, _ in run_side(args, args.nproc, 1, out, red)[args.warmup:]]
                with open(os.path.join(out, "imbalance.json")) as f:
                    rows = json.load(f)
                # with replicas: the steps after the first placement from measured loads
                sides[red] += rows[args.rebalance_every if red else args.warmup:]
    print(f"{'redundant slots':>16} {'max/mean rows per rank (mean over steps, per MoE layer)':>58} {'step ms':>9}")
    result = {}
    for red, rows in sides.items():
        per_layer = [statistics.mean(step[i] for step in rows) for i in range(len(rows[0]))]
        result[red] = per_layer
        print(f"{red:>16} {' '.join(f'{v:.3f}' for v in per_layer):>58} {statistics.median(times[red]) * 1e3:9.1f}")
    g = torch.Generator().manual_seed(0)
    print("# the policy alone, DeepSeek-V3 shape (256 experts in 8 groups, 58 layers), Zipf(s) loads, max/mean "
          "tokens per rank:")
    print(f"{'s':>5} {'nodes x ranks':>14} {'no replicas':>12} {'EPLB, +1 slot per rank':>23}")
    for s_exp in (0.6, 1.0, 1.4):
        base = 1.0 / torch.arange(1, 257, dtype=torch.float64) ** s_exp
        load = torch.stack([base[torch.randperm(256, generator=g)] for _ in range(58)])
        for nodes, ranks in ((1, 8), (4, 32), (8, 64)):
            plain = load.view(58, ranks, -1).sum(-1)
            phy2log, _, count = rebalance(load, 256 + ranks, 8, nodes, ranks)
            placed = (load / count).gather(1, phy2log).view(58, ranks, -1).sum(-1)
            ratio = lambda x: float((x.max(1).values / x.mean(1)).mean())  # noqa: E731
            print(f"{s_exp:>5} {f'{nodes} x {ranks}':>14} {ratio(plain):12.3f} {ratio(placed):23.3f}")
    print(f"# load average at the end: {os.getloadavg()[0]:.2f}")
    print(json.dumps({"bench": "eplb", "model": args.model, "nproc": args.nproc, "skew": args.skew,
                      "max_over_mean_per_layer": {str(k): [round(v, 4) for v in vs] for k, vs in result.items()}}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, default=2, help="expert-parallel processes (and the single side's threads)")
    p.add_argument("--model", default="tiny-v3", help="a preset name")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the median")
    p.add_argument("--rounds", type=int, default=2, help="runs of each side, alternated")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--pipeline", action="store_true", help="pipeline schedules' bubble and step time instead "
                   "(bench/parallel_pp.py; --nproc pipeline ranks)")
    from bench.parallel_pp import add_arguments

    add_arguments(p)
    p.add_argument("--imbalance", action="store_true", help="EPLB: load imbalance without and with --redundant")
    p.add_argument("--redundant", type=int, default=0, help="replica slots per MoE layer (with --imbalance)")
    p.add_argument("--rebalance-every", type=int, default=4)
    p.add_argument("--skew", type=float, default=0.0, help="skewed routing: correction-bias spread (0: off)")
    args = p.parse_args()
    if args.pipeline:
        from bench.parallel_pp import main as pipeline_main

        return pipeline_main(args)
    if args.worker:
        return worker(args)
    if args.imbalance:
        return load_imbalance(args)
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}; model {args.model}, "
          f"global batch {args.batch_size} x {args.seq_len}, {args.steps} steps ({args.warmup} warm-up) x "
          f"{args.rounds} rounds; load average at the start {os.getloadavg()[0]:.2f}")
    ep_name, base = f"EP={args.nproc}", "1 proc x 1 thread"
    layouts = {base: (1, 1), f"1 proc x {args.nproc} threads": (1, args.nproc), ep_name: (args.nproc, 1)}
    sides: dict[str, list] = {name: [] for name in layouts}
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (nproc, threads) in layouts.items():
                times = run_side(args, nproc, threads, os.path.join(tmp, f"{nproc}-{threads}-{r}"))
                sides[name] += times[args.warmup:]
                losses[name] = times[-1][2]
    median = {name: statistics.median(t for t, _, _ in rows) for name, rows in sides.items()}
    a2a = int(statistics.median(b for _, b, _ in sides[ep_name]))
    print(f"{'side':>20} {'step ms':>9} {'ratio':>6} {'a2a bytes/step (rank 0)':>24} {'last loss':>10}")
    for name in sides:
        print(f"{name:>20} {median[name] * 1e3:9.1f} {median[name] / median[base]:6.2f} "
              f"{a2a if name == ep_name else 0:>24} {losses[name]:10.4f}")
    print(f"# load average at the end (1/5 min): {os.getloadavg()[0]:.2f} / {os.getloadavg()[1]:.2f}")
    print(json.dumps({"bench": "parallel", "model": args.model, "nproc": args.nproc, "device": args.device,
                      "single_step_ms": round(median[base] * 1e3, 2),
                      "single_threads_step_ms": round(median[f"1 proc x {args.nproc} threads"] * 1e3, 2),
                      "ep_step_ms": round(median[ep_name] * 1e3, 2),
                      "ratio": round(median[ep_name] / median[base], 3),
                      "all_to_all_bytes_per_step": a2a, "load_avg_end": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
