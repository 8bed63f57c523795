"""The label-free GRPO demonstration over several seeds: is the gain the method's or one lucky start's?

For each seed: the `rl-start` SFT recipe with that seed (its own data order and initial state), then
label-free GRPO (majority vote + format, the ground truth never read) with that seed, exactly as the
documented demonstration runs it. Prints each seed's held-out greedy accuracy before and after, the mean
and spread (sample standard deviation, min-max) of the start, the end and the gain, the CPU it ran on,
and a final JSON line.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/rl_seeds.py --seeds 0,1,2 --steps 160

Each seed's runs live under --out-dir/seed-N (rl-start/ and the GRPO run's label-free/); an existing
finished seed is read back rather than rerun, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from openr2.train.run import machine_description  # noqa: E402


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def one_seed(seed: int, args) -> dict:
    out = os.path.join(args.out_dir, f"seed-{seed}")
    start_model = os.path.join(out, "rl-start", "model")
    t0 = time.time()
    if not os.path.isfile(os.path.join(start_model, "config.json")):
        _run([sys.executable, "-m", "openr2", "train", "--preset", "rl-start", "--seed", str(seed),
              "--out-dir", os.path.join(out, "rl-start"), "--export", start_model])
    sft_minutes = (time.time() - t0) / 60
    evals = os.path.join(out, "label-free", "eval.jsonl")
    t1 = time.time()
    if not os.path.isfile(os.path.join(out, "label-free", "summary.json")):
        _run([sys.executable, "bench/rl.py", "--model", start_model, "--task", args.task, "--temperature",
              str(args.temperature), "--majority-min-share", "0.5", "--kl-beta", "0.05", "--steps", str(args.steps),
              "--eval-every", str(args.steps), "--modes", "label-free", "--seed", str(seed), "--out-dir", out])
    with open(evals, encoding="utf-8") as f:
        rows = [json.loads(line)[args.task] for line in f]
    return {"seed": seed, "before": rows[0], "after": rows[-1], "sft_minutes": round(sft_minutes, 1),
            "grpo_minutes": round((time.time() - t1) / 60, 1)}


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f} (min {min(values):.1f}, max {max(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--task", default="sum:4")
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--out-dir", default="runs/rl-seeds")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = [one_seed(s, args) for s in seeds]
    print(f"\nlabel-free GRPO on {args.task}, {args.steps} steps, seeds {seeds}; {machine_description()}")
    print("| seed | SFT start greedy | after GRPO | gain | pass@1 before -> after | maj@8 before -> after |")
    print("|---|---|---|---|---|---|")
    for r in results:
        b, a = r["before"], r["after"]
        print(f"| {r['seed']} | {100 * b['greedy']:.1f}% | {100 * a['greedy']:.1f}% | "
              f"{100 * (a['greedy'] - b['greedy']):+.1f} | {100 * b['pass@1']:.1f} -> {100 * a['pass@1']:.1f} | "
              f"{100 * b['maj@8']:.1f} -> {100 * a['maj@8']:.1f} |")
    start = [100 * r["before"]["greedy"] for r in results]
    end = [100 * r["after"]["greedy"] for r in results]
    gain = [e - s for s, e in zip(start, end)]
    print(f"start {spread(start)}; after {spread(end)}; gain {spread(gain)} points")
    print(json.dumps({"task": args.task, "steps": args.steps, "cpu": machine_description(), "runs": results,
                      "gain_mean": statistics.mean(gain), "gain_stdev": statistics.stdev(gain) if len(gain) > 1 else 0}))


if __name__ == "__main__":
    main()
