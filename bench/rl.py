"""GRPO demonstration: from one SFT checkpoint, three runs side by side — label-free (majority vote + format,
the ground truth never read), verifiable (the task's checker + format) and self-judge (the policy grades
its own answers + format) — each evaluated on the same held-out problems before and after.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/rl.py --model openr2/assets/openr2-demo --task subtraction:5

The self-judge run is short (--judge-steps, one sampling round, 2 judge samples): every answer is judged
by k generations, which makes its steps several times dearer than the others.

Prints a table (greedy, pass@1, maj@8, pass@8 at the start and after each run) and a final JSON line;
each run's logs, eval.jsonl and rl.png are under --out-dir/<mode>.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from openr2.train.grpo import GRPOConfig, run  # noqa: E402

MODES = {
    "label-free": "majority:1,format:0.1",
    "verifiable": "verifiable:1,format:0.1",
    "self-judge": "judge:1,format:0.1",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="openr2/assets/openr2-demo")
    ap.add_argument("--task", default="subtraction:5")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--judge-steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (rollouts, pass@1, maj@8)")
    ap.add_argument("--kl-beta", type=float, default=0.0, help="KL penalty to the frozen start (k3 estimator)")
    ap.add_argument("--majority-min-share", type=float, default=0.0,
                    help="label-free: the top answer's share of a group's votes needed for a pseudo-label")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: start and end)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    ap.add_argument("--out-dir", default="runs/rl-bench")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    results: dict[str, dict] = {}
    t0 = time.time()
    for mode in args.modes.split(","):
        judge = mode == "self-judge"
        cfg = GRPOConfig(model=args.model, task=args.task, rewards=MODES[mode],
                         steps=args.judge_steps if judge else args.steps, prompts_per_step=args.prompts_per_step,
                         group_size=args.group_size, lr=args.lr, temperature=args.temperature, kl_beta=args.kl_beta,
                         max_tokens=args.max_tokens, eval_samples=args.eval_samples, eval_k=8,
                         eval_every=args.eval_every, out_dir=os.path.join(args.out_dir, mode),
                         seed=args.seed, judge_samples=2, judge_max_tokens=96,
                         majority_min_share=args.majority_min_share,
                         max_sampling_rounds=1 if judge else 4)
        if os.path.isdir(cfg.out_dir):
            raise SystemExit(f"{cfg.out_dir} exists: choose another --out-dir")
        start = time.time()
        summary = run(cfg)
        with open(os.path.join(cfg.out_dir, "eval.jsonl"), encoding="utf-8") as f:
            evals = [json.loads(line) for line in f]
        with open(os.path.join(cfg.out_dir, "log.jsonl"), encoding="utf-8") as f:
            log = [json.loads(line) for line in f]
        results[mode] = {"before": evals[0][args.task], "after": evals[-1][args.task],
                         "minutes": round((time.time() - start) / 60, 1), "steps": summary["steps"],
                         "last_reward": log[-1]["reward_mean"] if log else None,
                         **{k: log[-1][k] for k in ("pseudo_label_accuracy", "judge_accuracy") if log and k in log[-1]}}
        print(f"{mode}: {json.dumps(results[mode])}", flush=True)

    first = next(iter(results.values()))["before"]
    print(f"\nGRPO on {args.task} from {args.model}: {args.steps} steps x {args.prompts_per_step} prompts x "
          f"G={args.group_size}, lr {args.lr:g}, T {args.temperature:g}; held-out: {first['n']} problems (greedy) / "
          "8 samples each")
    print("| run | greedy | pass@1 | maj@8 | pass@8 | minutes |")
    print("|---|---|---|---|---|---|")
    row = lambda name, e, m: print(f"| {name} | {100 * e['greedy']:.1f}% | {100 * e['pass@1']:.1f}% | "  # noqa: E731
                                   f"{100 * e['maj@8']:.1f}% | {100 * e['pass@8']:.1f}% | {m} |")
    row("SFT start", first, "")
    for mode, r in results.items():
        row(f"GRPO {mode}", r["after"], r["minutes"])
    print(json.dumps({"task": args.task, "total_minutes": round((time.time() - t0) / 60, 1), "runs": results}))


if __name__ == "__main__":
    main()
