"""Dynamic sparsity's trade-off: fixed top-k vs the top-p router mode (config.routing_top_p, model/moe.py) on the
synthetic tasks, at an equal training budget (same model, data, steps and seed), side by side in one run.

Each side trains a small MoE (16 routed experts, at most --k per token, 1 shared) by SFT on --tasks for --steps
steps, then measures on held-out (test-split) problems: the mean answer-token cross-entropy, and the routed
experts each real (non-padding) token ran in every MoE layer. Routed-expert FLOPs per token are proportional
to that count (every routed expert has the same shape), so their ratio is the count's ratio. The dynamic side
keeps, per token, the fewest of its k candidates whose normalised gates reach --top-p (at least --min-k), and
trains with --penalty times the smooth count of experts beyond min_k (Gate.extra). Prints the loss of each
side, the relative loss cost, the FLOPs saving and the dynamic side's per-token expert-count histogram;
--seeds repeats both sides with other seeds (the spread says what a difference of the held-out loss means).

    python bench/dynamic_sparsity.py --steps 300 --seeds 0 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_name  # noqa: E402


def model_config(args, vocab: int, dynamic: bool, k: int | None = None):
    from openr2.config import ModelConfig

    base = ModelConfig(
        model_type="deepseek_v3", vocab_size=vocab, hidden_size=96, intermediate_size=256,
        moe_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1,
        n_routed_experts=16, num_experts_per_tok=k or args.k, routed_scaling_factor=2.5, n_group=1, topk_group=1,
        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, max_position_embeddings=256, rope_scaling=None, num_nextn_predict_layers=0,
    )
    if not dynamic:
        return base
    return dataclasses.replace(base, routing_top_p=args.top_p, routing_min_k=args.min_k,
                               routing_compute_penalty=args.penalty)


def held_out(args, tokenizer):
    from openr2.tasks.synthetic import held_out_problems
    from openr2.train.data import SFTDataset, sft_example
    from openr2.train.mixture import parse_mixture

    problems = [p for it in parse_mixture(args.tasks)
                for p in held_out_problems(it.task, it.difficulty, args.eval_per_item, seed=1234)]
    ds = SFTDataset([sft_example(p, tokenizer) for p in problems], 32, args.seq_len, tokenizer.pad_token_id,
                    shuffle=False, epochs=1, drop_last=False)
    return list(ds), len(problems)


@torch.no_grad()
def measure(model, batches, pad_id: int, k: int) -> dict:
    """Held-out loss and the routed experts per real token and MoE layer (a histogram over 0..k)."""
    from openr2.model.moe import MoE
    from openr2.train.evaluate import held_out_loss

    counts: list[torch.Tensor] = []
    hooks = [m.gate.register_forward_hook(lambda mod, inp, out: counts.append((out[0] != 0).sum(-1)))
             for m in model.modules() if isinstance(m, MoE)]
    try:
        loss = held_out_loss(model, batches)
    finally:
        for h in hooks:
            h.remove()
    layers = len(hooks)
    real = [ids.ne(pad_id).flatten() for ids, _ in batches]
    per_token = torch.cat([c[r] for i, r in enumerate(real) for c in counts[i * layers:(i + 1) * layers]])
    hist = torch.bincount(per_token, minlength=k + 1)
    return {"loss": loss, "experts_per_token": float(per_token.double().mean()),
            "histogram": (hist.double() / hist.sum()).tolist()}


def run_side(args, tokenizer, dataset_examples, eval_batches, dynamic: bool, seed: int, k: int | None = None
             ) -> dict:
    from openr2.model.transformer import build_model
    from openr2.train.config import TrainConfig
    from openr2.train.data import SFTDataset
    from openr2.train.trainer import Trainer

    config = model_config(args, tokenizer.vocab_size, dynamic, k)
    model = build_model(config, seed=seed)
    data = SFTDataset(dataset_examples, args.batch_size, args.seq_len, tokenizer.pad_token_id, seed=seed)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(mode="sft", steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                          lr=args.lr, warmup_steps=20, out_dir=out, save_every=args.steps + 1, seed=seed,
                          log_every=args.steps, deterministic=False)
        trainer = Trainer(model, data, cfg)
        trainer.save = lambda: None  # measured here, nothing to keep
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    return {**measure(model, eval_batches, tokenizer.pad_token_id, args.k), "train_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="addition:1-3,subtraction:1-3,multiplication:1-2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--k", type=int, default=4, help="fixed top-k, and the dynamic side's most experts")
    ap.add_argument("--top-p", type=float, default=0.6)
    ap.add_argument("--min-k", type=int, default=1)
    ap.add_argument("--penalty", type=float, default=0.01)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--smaller-k", type=int, nargs="*", default=[],
                    help="also fixed top-k' sides with these k' < k: does dynamic k beat just running fewer?")
    ap.add_argument("--eval-per-item", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from openr2.tokenizer import train_bpe
    from openr2.train.config import TrainConfig
    from openr2.train.mixture import mixture_examples, parse_mixture
    from openr2.train.run import tokenizer_corpus

    tokenizer = train_bpe(tokenizer_corpus(TrainConfig(tasks=args.tasks, num_examples=4000)), vocab_size=512)
    examples = mixture_examples(parse_mixture(args.tasks), args.steps * args.batch_size, tokenizer, seed=0)
    eval_batches, n_eval = held_out(args, tokenizer)
    print(f"CPU: {cpu_name()}; torch threads {args.threads}; load average {os.getloadavg()[0]:.1f} at start")
    print(f"tasks {args.tasks}; {args.steps} steps x {args.batch_size} examples; held-out {n_eval} problems; "
          f"fixed top-{args.k} vs top-p {args.top_p} (k {args.min_k}..{args.k}, penalty {args.penalty})")
    results = []
    for seed in args.seeds:
        sides = [("fixed", False, args.k), ("dynamic", True, args.k)] + \
            [(f"fixed-{k}", False, k) for k in args.smaller_k]
        for side, dynamic, k in sides:  # alternated, so that the load moves the sides alike
            r = run_side(args, tokenizer, examples, eval_batches, dynamic, seed, k)
            r.update(seed=seed, side=side)
            results.append(r)
            print(f"seed {seed} {r['side']:9s}: held-out loss {r['loss']:.4f}, routed experts/token "
                  f"{r['experts_per_token']:.3f}, train {r['train_s']:.0f} s; histogram k=0..{args.k}: "
                  + " ".join(f"{h:.3f}" for h in r["histogram"]), flush=True)
    by = {s: [r for r in results if r["side"] == s] for s in dict.fromkeys(r["side"] for r in results)}
    loss = {s: statistics.mean(r["loss"] for r in rs) for s, rs in by.items()}
    experts = {s: statistics.mean(r["experts_per_token"] for r in rs) for s, rs in by.items()}
    cost = loss["dynamic"] / loss["fixed"] - 1
    saving = 1 - experts["dynamic"] / experts["fixed"]
    print(f"mean over seeds: held-out loss fixed {loss['fixed']:.4f} dynamic {loss['dynamic']:.4f} "
          f"({cost:+.2%}); routed-expert FLOPs per token {saving:.1%} fewer "
          f"({experts['dynamic']:.3f} vs {experts['fixed']:.3f} experts); load average {os.getloadavg()[0]:.1f}")
    for side in by:
        if side.startswith("fixed-"):
            print(f"  {side}: held-out loss {loss[side]:.4f} ({loss[side] / loss['fixed'] - 1:+.2%} vs fixed "
                  f"top-{args.k}), {1 - experts[side] / experts['fixed']:.1%} fewer routed-expert FLOPs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "loss_cost": cost, "flops_saving": saving}, f)


if __name__ == "__main__":
    main()
