"""PNG curves of a training run from its logs: loss.png, accuracy.png, expert_load.png in the run directory.

Reads out_dir/log.jsonl (per step) and out_dir/eval.jsonl (per evaluation); a plot whose data is absent
(no MoE layers, no evaluation) is skipped. Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import os


def _records(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def plot_run(out_dir: str) -> list[str]:
    """Write the plots that the logs support; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openr2.train.loop import EVAL_FILE, LOG_FILE

    log, evals = _records(os.path.join(out_dir, LOG_FILE)), _records(os.path.join(out_dir, EVAL_FILE))
    written = []

    def save(fig, name: str) -> None:
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if log:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in log]
        ax.plot(steps, [r["loss"] for r in log], label="train loss", lw=1)
        if any("mtp_loss" in r for r in log):
            ax.plot([r["step"] for r in log if "mtp_loss" in r], [r["mtp_loss"] for r in log if "mtp_loss" in r],
                    label="MTP loss", lw=1, alpha=0.7)
        held = [r for r in evals if "eval_loss" in r]
        if held:
            ax.plot([r["step"] for r in held], [r["eval_loss"] for r in held], "o-", label="held-out loss")
        ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", yscale="log", title="loss")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "loss.png")

    acc = [r for r in evals if r.get("accuracy")]
    if acc:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in acc[-1]["accuracy"]:
            points = [(r["step"], r["accuracy"][name]["accuracy"]) for r in acc if name in r["accuracy"]]
            ax.plot(*zip(*points), "o-", label=name, ms=3)
        ax.set(xlabel="step", ylabel="greedy exact accuracy", ylim=(0, 1.02), title="held-out task accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        save(fig, "accuracy.png")

    loads = [r for r in log if r.get("expert_load")]
    if loads:
        fig, ax = plt.subplots(figsize=(7, 4))
        for layer in range(len(loads[-1]["expert_load"])):
            points = [(r["step"], r["expert_load"][layer]["max_over_mean"]) for r in loads
                      if layer < len(r["expert_load"])]
            ax.plot(*zip(*points), label=f"MoE layer {layer}", lw=1)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set(xlabel="step", ylabel="max / mean tokens per expert", title="expert load (per step)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "expert_load.png")
    return written


def plot_rl(out_dir: str) -> list[str]:
    """rl.png: reward per source and ground-truth accuracy of the rollouts per step, and held-out greedy
    accuracy at each evaluation (from an `openr2 rl` run's log.jsonl and eval.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openr2.train.loop import EVAL_FILE, LOG_FILE

    log, evals = _records(os.path.join(out_dir, LOG_FILE)), _records(os.path.join(out_dir, EVAL_FILE))
    if not log and not evals:
        return []
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({k for r in log for k in r if k.startswith("reward_") and not k.endswith("_std")})
    for key in keys + ["accuracy", "pseudo_label_accuracy"]:
        points = [(r["step"], r[key]) for r in log if key in r]
        if points:
            left.plot(*zip(*points), label=key, lw=1)
    left.set(xlabel="step", title="rollouts (training prompts)", ylim=(0, 1.02))
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    names = sorted({k for r in evals for k, v in r.items() if isinstance(v, dict)})
    for name in names:
        for metric in ("greedy", "maj@8", "pass@8"):
            points = [(r["step"], r[name][metric]) for r in evals if metric in r.get(name, {})]
            if points:
                right.plot(*zip(*points), "o-", ms=3, label=f"{name} {metric}")
    right.set(xlabel="step", title="held-out accuracy", ylim=(0, 1.02))
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "rl.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
