"""Pipeline parallelism's bubble (bench/parallel.py --pipeline): per schedule, the share of each rank's step
time spent idle, measured from per-stage timelines, beside the schedule's formula, and the step time.

Every rank records the start and end of each forward (F), backward (B: whole, or its input part under the
zero-bubble schedules) and weight-backward (W) chunk its stages run (pipeline.record_timeline) and the span
of each schedule.step (the pipeline's part of a training step: the optimizer, the gradient and load
all-reduces around it are not a bubble); bubble = 1 - (sum of the rank's chunk times in it) / (its time),
averaged over ranks and steps after the warm-up. Beside it, "replayed": the bubble the schedule's action order leaves
with the measured mean chunk times, one core per rank and free communication (pipeline.simulated_bubble),
and the formula (pipeline.ideal_bubble: equal chunk times, 1F1B (p-1)/(m+p-1), interleaved
(p-1)/(2m+p-1), ZB-V and DualPipeV their tables played with F = I = W). measured - replayed is what
communication and waiting for a core cost. The schedules run one after the other, alternated `--rounds`
times, the one-process step on the same global batch beside them. On a CPU box with fewer free cores than ranks a rank also waits
for a core: read the bubble beside the load average.

    python bench/parallel.py --pipeline --nproc 4 --layers 8 --steps 8 --rounds 2
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCHEDULES = ("1f1b", "interleaved", "zbv", "dualpipev")


def worker(args) -> None:
    """One rank (or the one-process side, schedule "none"): writes its step spans and chunk timeline."""
    from bench.parallel import RandomWindows
    from openr2.model.transformer import build_model
    from openr2.presets import get_preset
    from openr2.train import distributed
    from openr2.train.config import TrainConfig
    from openr2.train.pipeline_trainer import PipelineTrainer
    from openr2.train.trainer import Trainer

    dist = distributed.init(args.device)
    device = torch.device(args.device, dist.local_rank) if args.device == "cuda" else torch.device("cpu")
    torch.set_num_threads(args.threads)
    config = dataclasses.replace(get_preset(args.model), num_hidden_layers=args.layers)
    model = build_model(config, seed=0, device=device)
    pp = dist.world_size if args.schedule != "none" else 1
    cfg = TrainConfig(mode="pretrain", steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      warmup_steps=1, out_dir=args.out, save_every=args.steps + 1, deterministic=False,
                      device=args.device, pipeline_parallel=pp, pp_schedule=args.schedule if pp > 1 else "1f1b",
                      microbatches=args.microbatches if pp > 1 else 0)
    data = RandomWindows(args.batch_size, args.seq_len, config.vocab_size)
    trainer = (PipelineTrainer if pp > 1 else Trainer)(model, data, cfg)
    trainer.save = lambda: None  # timing only: no checkpoint
    timeline = trainer.record_timeline() if pp > 1 else []
    spans, pipe, step = [], [], trainer.train_step
    if pp > 1:  # the schedule's own span in each step (the bubble's denominator)
        run = trainer.schedule.step

        def timed_schedule(*a, **k):
            t0 = time.perf_counter()
            out = run(*a, **k)
            pipe.append((t0, time.perf_counter()))
            return out

        trainer.schedule.step = timed_schedule

    def timed_step():
        t0 = time.perf_counter()
        record = step()
        spans.append((t0, time.perf_counter(), record["loss"]))
        return record

    trainer.train_step = timed_step
    trainer.train()
    with open(os.path.join(args.out, f"rank{dist.rank}.json"), "w") as f:
        json.dump({"spans": spans, "pipe": pipe, "timeline": timeline}, f)
    distributed.shutdown(dist)


def run_side(args, schedule: str, out: str) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    common = [str(REPO / "bench/parallel.py"), "--pipeline", "--worker", "--out", out, "--model", args.model,
              "--layers", str(args.layers), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--seq-len", str(args.seq_len), "--device", args.device, "--schedule", schedule,
              "--microbatches", str(args.microbatches), "--threads", "1"]
    nproc = 1 if schedule == "none" else args.nproc
    cmd = [sys.executable, *common] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *common]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    ranks = []
    for r in range(nproc):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    return ranks


def bubbles(ranks: list[dict], warmup: int) -> tuple[list[float], dict[str, float]]:
    """Per (rank, step) idle share after the warm-up; mean chunk ms per kind."""
    out, chunks = [], {}
    for rank in ranks:
        for t0, t1 in rank["pipe"][warmup:]:
            busy = sum(min(e, t1) - max(s, t0) for _, _, s, e in rank["timeline"] if s < t1 and e > t0)
            out.append(1 - busy / (t1 - t0))
        first = rank["pipe"][warmup][0]
        for _, kind, s, e in rank["timeline"]:
            if s >= first:
                chunks.setdefault(kind, []).append(e - s)
    return out, {k: statistics.mean(v) * 1e3 for k, v in chunks.items()}


def main(args) -> None:
    import tempfile

    from openr2.train.pipeline import ideal_bubble, simulated_bubble

    if args.worker:
        return worker(args)
    p, m = args.nproc, args.microbatches
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}; {args.model} with "
          f"{args.layers} layers, global batch {args.batch_size} x {args.seq_len}, pipeline {p} ranks x "
          f"{m} micro-batches, {args.steps} steps ({args.warmup} warm-up) x {args.rounds} rounds; "
          f"load average at the start {os.getloadavg()[0]:.2f}")
    sides = ("none", *SCHEDULES)
    steps: dict[str, list] = {s: [] for s in sides}
    idle: dict[str, list] = {s: [] for s in sides}
    chunk_ms: dict[str, dict] = {}
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for s in sides:
                ranks = run_side(args, s, os.path.join(tmp, f"{s}-{r}"))
                steps[s] += [t1 - t0 for t0, t1, _ in ranks[0]["spans"][args.warmup:]]
                losses[s] = ranks[0]["spans"][-1][2]
                if s != "none":
                    b, chunk_ms[s] = bubbles(ranks, args.warmup)
                    idle[s] += b
    base = statistics.median(steps["none"])
    print(f"{'schedule':>12} {'step ms':>8} {'vs 1 proc':>9} {'bubble':>7} {'replayed':>8} {'formula':>8} "
          f"{'F ms':>6} {'B ms':>6} {'W ms':>6} {'last loss':>10}")
    rows = []
    for s in sides:
        step = statistics.median(steps[s])
        if s == "none":
            print(f"{'1 process':>12} {step * 1e3:8.1f} {1:9.2f} {'':>7} {'':>8} {'':>8} {'':>6} {'':>6} {'':>6} "
                  f"{losses[s]:10.4f}")
            continue
        bubble, formula, c = statistics.mean(idle[s]), ideal_bubble(s, p, m), chunk_ms[s]
        replayed = simulated_bubble(s, p, m, c["F"], c["B"], c.get("W", 0.0))
        print(f"{s:>12} {step * 1e3:8.1f} {step / base:9.2f} {bubble:7.3f} {replayed:8.3f} {formula:8.3f} "
              f"{c.get('F', 0):6.2f} {c.get('B', 0):6.2f} {c.get('W', 0):6.2f} {losses[s]:10.4f}")
        rows.append({"schedule": s, "step_ms": round(step * 1e3, 2), "bubble": round(bubble, 4),
                     "replayed": round(replayed, 4), "formula": round(formula, 4),
                     "chunk_ms": {k: round(v, 3) for k, v in c.items()}})
    print(f"# load average at the end (1/5 min): {os.getloadavg()[0]:.2f} / {os.getloadavg()[1]:.2f}")
    print(json.dumps({"bench": "parallel-pipeline", "model": args.model, "layers": args.layers, "pp": p,
                      "microbatches": m, "single_step_ms": round(base * 1e3, 2), "schedules": rows,
                      "load_avg_end": round(os.getloadavg()[0], 2)}))


def add_arguments(p) -> None:
    p.add_argument("--schedule", default="1f1b", help="(worker) none: the one-process side")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the model (--pipeline)")
    p.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (--pipeline)")
