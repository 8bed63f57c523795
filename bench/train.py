"""Training throughput: how many tokens/s does an openr2 training step process vs transformers'?

One training step = forward, cross-entropy, backward, gradient clipping, AdamW step, on one batch of
[B, T] inputs with [B, T] next-token targets. Both sides run the SAME DeepSeek-V3-style MoE model with the
same weights: transformers builds DeepseekV3ForCausalLM from openr2's ModelConfig.to_hf(), every tensor is
perturbed (no zero or constant tensors), saved with save_pretrained, and both sides load that directory.
Same batch, float32, CPU, train mode.

  openr2        what Trainer.train_step / _micro_loss do (openr2/train/trainer.py, trainer defaults):
                model(inputs, return_hidden=True, moe_impl="fused") on the training paths (naive MLA, the
                fused grouped experts), CE in float32, the sequence-wise balance loss of every MoE layer (alpha 1e-4)
                and the expert-load bookkeeping, backward, clip_grad_norm_(1.0), AdamW (decay on 2+-D
                tensors, foreach=False as the Trainer), then update_correction_bias.
  transformers  model(input_ids, use_cache=False).logits (its defaults: sdpa attention, grouped_mm
                experts), the same explicit CE, backward, the same clipping and the same AdamW.
openr2 does slightly more work (balance loss, load counts, correction-bias update); transformers has none.
  openr2 kernels only   the matmul and attention kernel calls (forward and backward) of one openr2 step,
                replayed back to back on the same tensors with nothing between them: a floor for any
                implementation doing the model's products with these kernels; the transformers time over it
                is the highest ratio such an implementation could reach.

Models: `demo` (default), the shape of the demo model's training recipe: 4 layers (1 dense + 3 MoE),
hidden 128, 4 heads, no q LoRA, kv LoRA 48, 8 routed experts top-2 + 1 shared, vocab 512; `bench-moe`,
openr2.presets.bench_moe() (6 layers, hidden 256, 16 experts, q LoRA, YaRN, vocab 4096).

Before timing, one step's CE loss and gradient norm (balance loss off on both sides) are checked equal
(float32, tight tolerance) and printed. Then every (side, thread count) row gets warm-up steps and timed
steps in interleaved rounds (row A, row B, ..., again), and the medians are reported; each side is
compared at its best thread count. The machine these run on is shared, so the script also reports how much
CPU other processes took during the timing.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/train.py [--model demo|bench-moe --batch 32 --seq 96
      --runs 7 --threads 1,2]
Prints a header, a table (with each row's CPU-seconds per step: on a shared machine a row that lost its CPU
for a while shows it in wall time, not in CPU time), the ratio openr2/transformers (each at its best thread
count), openr2 over its floor (medians, per round, CPU time) and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

import transformers  # noqa: E402
from transformers import DeepseekV3ForCausalLM  # noqa: E402

from bench.common import heavy_kernel_replay, make_hf_checkpoint, time_rows  # noqa: E402
from bench.forward import cpu_timed  # noqa: E402
from openr2 import load_model  # noqa: E402
from openr2.config import ModelConfig  # noqa: E402
from openr2.model.moe import MoE, update_correction_bias  # noqa: E402
from openr2.presets import bench_moe  # noqa: E402

FLOOR = "openr2 kernels only (floor)"
LOSS_TOL = 1e-5       # relative, on the CE loss of one batch
GRAD_NORM_TOL = 1e-4  # relative, on the global gradient norm of that batch
# Trainer defaults (openr2/train/trainer.py TrainConfig)
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP, AUX_ALPHA, BALANCE_GAMMA = 3e-4, (0.9, 0.95), 0.1, 1.0, 1e-4, 1e-3


def demo_config() -> ModelConfig:
    """The demo model's shape (hidden 128, 4 layers, 8 experts top-2 + 1 shared, vocab 512)."""
    h = 128
    return ModelConfig(
        model_type="deepseek_v3", vocab_size=512, hidden_size=h, intermediate_size=3 * h,
        moe_intermediate_size=h, num_hidden_layers=4, num_attention_heads=4, n_shared_experts=1,
        n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=2.5, n_group=1, topk_group=1,
        first_k_dense_replace=1, kv_lora_rank=48, q_lora_rank=None, qk_nope_head_dim=h // 4,
        qk_rope_head_dim=16, v_head_dim=h // 4, max_position_embeddings=512, rope_scaling=None,
        num_nextn_predict_layers=0,
    )


MODELS = {"demo": demo_config, "bench-moe": bench_moe}




def param_groups(model: torch.nn.Module) -> list[dict]:
    """As the Trainer: decay on 2+-D parameters, none on 1-D ones; tied weights once."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


class Side:
    """One model + its AdamW; `step()` is one full training step, `check()` one CE forward/backward."""

    def __init__(self, name: str, model: torch.nn.Module, is_openr2: bool):
        self.name, self.model, self.is_openr2 = name, model.train(), is_openr2
        self.moe = [m for m in model.modules() if isinstance(m, MoE)] if is_openr2 else []
        self.params = [p for g in param_groups(model) for p in g["params"]]
        self.optimizer = torch.optim.AdamW(param_groups(model), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                                           foreach=False)

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not self.is_openr2:
            return ce(self.model(input_ids=inputs, use_cache=False).logits, targets)
        logits, _hidden = self.model(inputs, return_hidden=True, moe_impl="fused")  # as Trainer._micro_loss
        loss = ce(logits, targets)
        aux = [m.aux_loss for m in self.moe if m.aux_loss is not None]
        if aux:
            loss = loss + torch.stack([a.float() for a in aux]).sum()
        return loss

    def check(self, inputs, targets) -> tuple[float, float]:
        """(CE loss, global grad norm) of one batch, balance loss off, no optimizer step."""
        for m in self.moe:
            m.aux_loss_alpha = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(inputs, targets)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, float("inf"), foreach=False)
        self.optimizer.zero_grad(set_to_none=True)
        for m in self.moe:
            m.aux_loss_alpha = AUX_ALPHA
            m.expert_load.zero_()
        return loss.item(), norm.item()

    def step(self, inputs, targets) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(inputs, targets)
        loss.backward()
        value = loss.item()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP, foreach=False)
        self.optimizer.step()
        if self.is_openr2:
            update_correction_bias(self.model, BALANCE_GAMMA)
        return value






def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="demo")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--runs", type=int, default=7, help="timed steps per row (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, each side at each")
    ap.add_argument("--no-transformers-eager-experts", action="store_true", dest="no_eager",
                    help="skip the transformers row with experts_implementation='eager'")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    thread_counts = [int(t) for t in args.threads.split(",")]
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = MODELS[args.model]()

    print(f"# training step: openr2 vs transformers, {args.model}, batch {args.batch} x seq {args.seq}, "
          f"float32 CPU, fwd + CE + bwd + clip + AdamW")
    print(f"# torch {torch.__version__}  transformers {transformers.__version__}  threads {thread_counts} "
          f"(of {os.cpu_count()} CPUs)  OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}  "
          f"runs {args.runs} (median)")

    with tempfile.TemporaryDirectory() as ckpt:
        hf_config = make_hf_checkpoint(ckpt, config, args.seed, eval_mode=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = load_model(ckpt)
        for w in caught:  # a dropped or missing tensor would show here; the loss check below decides
            print(f"# openr2 load warning: {w.message}")
        hf = DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        hf_eager = None if args.no_eager else DeepseekV3ForCausalLM.from_pretrained(
            ckpt, dtype=torch.float32, experts_implementation="eager")
    n_params = sum(p.numel() for p in ours.parameters())
    impl = f"{hf.config._attn_implementation}/{hf.config._experts_implementation}"
    sides = [Side("openr2 naive/grouped", ours, True), Side(f"transformers {impl}", hf, False)]
    if hf_eager is not None:
        sides.append(Side(f"transformers {hf_eager.config._attn_implementation}/"
                          f"{hf_eager.config._experts_implementation}", hf_eager, False))
    print(f"# model: {n_params / 1e6:.2f}M parameters, {config.num_hidden_layers} layers, hidden "
          f"{config.hidden_size}, {config.n_routed_experts} experts top-{config.num_experts_per_tok}, vocab "
          f"{config.vocab_size}")

    gen = torch.Generator().manual_seed(args.seed + 1)
    window = torch.randint(0, hf_config.vocab_size, (args.batch, args.seq + 1), generator=gen)
    inputs, targets = window[:, :-1].contiguous(), window[:, 1:].contiguous()

    # Same loss and same gradients before any step (balance loss off: transformers has none).
    checks = {s.name: s.check(inputs, targets) for s in sides}
    ref_loss, ref_norm = checks[sides[1].name]
    print("# loss / grad norm of one batch: " + ", ".join(f"{n}: {l:.7f} / {g:.6f}" for n, (l, g) in
                                                              checks.items()))
    for name, (loss, norm) in checks.items():
        if abs(loss - ref_loss) > LOSS_TOL * abs(ref_loss) or abs(norm - ref_norm) > GRAD_NORM_TOL * ref_norm:
            raise SystemExit(f"FAIL: {name} loss/grad norm {loss}/{norm} vs {ref_loss}/{ref_norm}")
    loss_diff = abs(checks[sides[0].name][0] - ref_loss)

    rows = {}
    for side in sides:
        for t in thread_counts:
            def run(side=side, t=t):
                torch.set_num_threads(t)
                side.step(inputs, targets)
            rows[(side.name, t)] = run
    replay, n_kernel_calls = heavy_kernel_replay(lambda: sides[0].step(inputs, targets))
    for t in thread_counts:
        def run_floor(t=t):
            torch.set_num_threads(t)
            replay()
        rows[(FLOOR, t)] = run_floor

    tokens = args.batch * args.seq
    rows, cpu_times = cpu_timed(rows)
    times, other_frac = time_rows(rows, args.runs, args.warmup)

    med = {key: statistics.median(ts) for key, ts in times.items()}
    cpu = {key: statistics.median(ts[args.warmup:]) for key, ts in cpu_times.items()}
    best = {s.name: min(thread_counts, key=lambda t, n=s.name: med[(n, t)]) for s in sides}
    ref_name = sides[1].name
    ref_best = tokens / med[(ref_name, best[ref_name])]
    print()
    print(f"| {'side':<34} | threads | {'median s':>9} | {'CPU s':>7} | {'tokens/s':>9} | {'vs transformers':>15} |")
    print(f"|{'-' * 36}|---------|{'-' * 11}|{'-' * 9}|{'-' * 11}|{'-' * 17}|")
    for (name, t), m in med.items():
        mark = " *" if best.get(name) == t else ""
        print(f"| {name + mark:<34} | {t:>7} | {m:>9.4f} | {cpu[(name, t)]:>7.3f} | {tokens / m:>9.0f} | "
              f"{tokens / m / ref_best:>14.2f}x |")
    print("(* = the side's best thread count; 'vs transformers' = against transformers' default at its best;"
          " CPU s = CPU-seconds of this process per step, all its threads)")
    print()
    ours_name = sides[0].name
    ratio = (tokens / med[(ours_name, best[ours_name])]) / ref_best
    fastest_ref = max(sides[1:], key=lambda s: tokens / med[(s.name, best[s.name])]).name
    ratio_fastest = med[(fastest_ref, best[fastest_ref])] / med[(ours_name, best[ours_name])]
    # Per-round paired ratios at the best thread counts: robust to a slow spell hitting one round.
    paired = statistics.median(r / o for o, r in zip(times[(ours_name, best[ours_name])],
                                                     times[(ref_name, best[ref_name])]))
    print(f"ratio openr2/transformers (best thread count each: {best[ours_name]} / {best[ref_name]}): "
          f"{ratio:.2f}x (median of per-round ratios {paired:.2f}x); vs the faster transformers row "
          f"({fastest_ref}): {ratio_fastest:.2f}x")
    floor_s = min(med[(FLOOR, t)] for t in thread_counts)
    ceiling = med[(ref_name, best[ref_name])] / floor_s
    # openr2 over its floor, each at its best thread count: medians, per round, and in CPU time at openr2's
    floor_t = min(thread_counts, key=lambda t: med[(FLOOR, t)])
    ours_t = best[ours_name]
    vs_floor = med[(ours_name, ours_t)] / floor_s
    vs_floor_paired = statistics.median(o / f for o, f in zip(times[(ours_name, ours_t)], times[(FLOOR, floor_t)]))
    vs_floor_cpu = cpu[(ours_name, ours_t)] / cpu[(FLOOR, ours_t)]
    print(f"ceiling: openr2's {n_kernel_calls} matmul/attention kernel calls of one step alone take {floor_s:.4f} s "
          f"at best ({floor_s / med[(ours_name, best[ours_name])]:.0%} of its step), so an implementation with no "
          f"work besides them would reach {ceiling:.2f}x")
    print(f"openr2 over its floor (best thread count each: {ours_t} / {floor_t}): {vs_floor:.3f}x (median of "
          f"per-round ratios {vs_floor_paired:.3f}x; in CPU time at {ours_t} threads {vs_floor_cpu:.3f}x)")
    print(json.dumps({
        "bench": "train", "model": args.model, "batch": args.batch, "seq": args.seq, "dtype": "float32",
        "device": "cpu", "threads": thread_counts, "runs": args.runs, "torch": torch.__version__,
        "transformers": transformers.__version__, "loss": round(ref_loss, 6),
        "loss_abs_diff": float(f"{loss_diff:.3g}"), "ratio": round(ratio, 4), "ratio_paired": round(paired, 4),
        "ratio_vs_best_transformers": round(ratio_fastest, 4), "ceiling_ratio": round(ceiling, 4),
        "vs_floor": round(vs_floor, 4), "vs_floor_paired": round(vs_floor_paired, 4),
        "vs_floor_cpu": round(vs_floor_cpu, 4),
        "other_load": None if other_frac is None else round(other_frac, 3),
        "rows": {f"{n} @{t}": {"median_s": round(m, 5), "cpu_s": round(cpu[(n, t)], 5),
                               "tokens_per_s": round(tokens / m, 1)} for (n, t), m in med.items()},
    }))


if __name__ == "__main__":
    main()
