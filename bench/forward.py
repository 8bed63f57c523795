"""Prefill throughput: how many prompt tokens/s does openr2's forward process vs transformers'?

Both sides run the SAME tiny DeepSeek-V3-style MoE model (`openr2.presets.bench_moe()`: 6 layers, hidden
256, 16 routed experts top-2, q LoRA, YaRN) with the same weights: transformers builds
DeepseekV3ForCausalLM from that config, the weights are perturbed (no zero tensors), saved with
save_pretrained, and both sides load that one directory. Same input ids, float32, CPU, inference_mode,
one forward over the whole prompt (no cache on either side: transformers gets use_cache=False).

First the logits of every row are checked against transformers' default (fails above 1e-3); then each
row is warmed up and timed, median of --runs, rounds interleaved across rows.

--dtype bfloat16 runs both sides in bfloat16 (openr2: load_model(dtype=torch.bfloat16), router in float32
as transformers keeps it; transformers: from_pretrained(dtype=torch.bfloat16)); on CPUs with AMX, oneDNN
runs the bfloat16 products on it. The logits of every bfloat16 row are checked against transformers'
float32 logits instead: openr2's mean and max |diff| may be at most twice transformers' own bfloat16 ones.
(The max is large on both sides: with random weights a bfloat16 rounding flips the routing of a few tokens
to other experts, whose logits then differ by O(1); the mean is the everyday rounding.) The machine these run on
is shared, so the script also reports how much CPU other processes took during the timing. Rows:
  openr2 naive/grouped      the prefill path (expanded K/V + SDPA, sorted expert dispatch)  <- ratio
  openr2 absorbed/grouped   the decode-oriented latent path, for comparison at this shape
  transformers sdpa         transformers' defaults (sdpa attention, grouped_mm experts)      <- ratio
  transformers eager        attn_implementation="eager" (--no-eager to skip)
  openr2 kernels only       the matmul and attention kernel calls of one openr2 naive/grouped forward,
                            replayed back to back on the same tensors with nothing between them: a floor
                            for any implementation doing the model's products with these kernels; the
                            transformers time over it is the highest ratio such an implementation could reach

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/forward.py [--batch 4 --seq 512 --runs 5 --threads N
      --dtype float32|bfloat16]
Prints a header, a table (with each row's CPU-seconds per run: on a shared machine a row that lost its CPU
for a while shows it in wall time, not in CPU time), the ratio openr2/transformers (vs transformers'
default, and vs its faster row), openr2 over its floor (medians, per-round, CPU time) and a final JSON
line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

import transformers  # noqa: E402
from transformers import DeepseekV3ForCausalLM  # noqa: E402

from bench.common import heavy_kernel_replay, make_hf_checkpoint, time_rows  # noqa: E402
from openr2 import load_model  # noqa: E402
from openr2.presets import bench_moe  # noqa: E402

MAX_DIFF = 1e-3
BF16_FACTOR = 2.0  # bfloat16 rows: mean and max |diff| vs float32 within this factor of transformers' bfloat16 ones
FLOOR = "openr2 kernels only (floor)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per row (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--no-eager", action="store_true", help="skip the transformers eager-attention row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                    help="both sides' dtype (bfloat16: logits checked against transformers' float32 logits)")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    print(f"# prefill forward: openr2 vs transformers, bench_moe, batch {args.batch} x seq {args.seq}, "
          f"{args.dtype} CPU")
    print(f"# torch {torch.__version__}  transformers {transformers.__version__}  threads {threads}  "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}  runs {args.runs} (median)")

    with tempfile.TemporaryDirectory() as ckpt:
        hf_config = make_hf_checkpoint(ckpt, bench_moe(), args.seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = load_model(ckpt, dtype=dtype)
        for w in caught:  # a dropped or missing tensor would show here; the logits check below decides
            print(f"# openr2 load warning: {w.message}")
        hf_sdpa = DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
        hf_eager = None if args.no_eager else DeepseekV3ForCausalLM.from_pretrained(
            ckpt, dtype=dtype, attn_implementation="eager").eval()
        hf_float32 = None if dtype == torch.float32 else DeepseekV3ForCausalLM.from_pretrained(
            ckpt, dtype=torch.float32).eval()
    if hf_sdpa.config._attn_implementation != "sdpa":
        print(f"# note: transformers default attention is {hf_sdpa.config._attn_implementation!r}")
    experts_impl = hf_sdpa.config._experts_implementation

    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, hf_config.vocab_size, (args.batch, args.seq), generator=gen)
    rows = {  # name -> zero-argument forward returning logits [B, T, V]
        "openr2 naive/grouped": lambda: ours(ids, attn_impl="naive", moe_impl="grouped"),
        "openr2 absorbed/grouped": lambda: ours(ids, attn_impl="absorbed", moe_impl="grouped"),
        f"transformers sdpa/{experts_impl}": lambda: hf_sdpa(ids, use_cache=False).logits,
    }
    if hf_eager is not None:
        rows[f"transformers eager/{experts_impl}"] = lambda: hf_eager(ids, use_cache=False).logits
    ours_key, ref_key = "openr2 naive/grouped", f"transformers sdpa/{experts_impl}"

    results = {}
    with torch.inference_mode():
        if hf_float32 is None:
            ref_name, ref = ref_key, rows[ref_key]()
        else:  # bfloat16: every row, transformers' included, against transformers' float32 logits
            ref_name, ref = "transformers sdpa float32", hf_float32(ids, use_cache=False).logits
            del hf_float32
        for name, fn in rows.items():
            diff = torch.zeros(()) if name == ref_name else (fn().float() - ref).abs()
            results[name] = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item()}
        print(f"# logits max |diff| vs {ref_name} (max |logit| {ref.abs().max().item():.3f}): "
              + ", ".join(f"{n}: {r['max_abs_diff']:.2e}" for n, r in results.items() if n != ref_name))
        if dtype == torch.float32:
            bad = {n: r["max_abs_diff"] for n, r in results.items() if not r["max_abs_diff"] <= MAX_DIFF}
            if bad:
                raise SystemExit(f"FAIL: logits differ by more than {MAX_DIFF}: {bad}")
        else:  # openr2 rows: mean and max error within BF16_FACTOR of transformers' own bfloat16 errors
            print("# logits mean |diff|: " + ", ".join(f"{n}: {r['mean_abs_diff']:.2e}" for n, r in results.items()))
            hf = results[ref_key]
            bad = {n: (r["mean_abs_diff"], r["max_abs_diff"]) for n, r in results.items() if n.startswith("openr2")
                   and not (r["mean_abs_diff"] <= BF16_FACTOR * hf["mean_abs_diff"]
                            and r["max_abs_diff"] <= BF16_FACTOR * hf["max_abs_diff"])}
            if bad:
                raise SystemExit(f"FAIL: bfloat16 logits (mean, max |diff|) over {BF16_FACTOR}x transformers' "
                                 f"({hf['mean_abs_diff']:.3g}, {hf['max_abs_diff']:.3g}): {bad}")
        del ref
        rows[FLOOR], n_kernel_calls = heavy_kernel_replay(rows[ours_key])

        tokens = args.batch * args.seq
        rows, cpu_times = cpu_timed(rows)
        all_times, other_frac = time_rows(rows, args.runs, args.warmup)
        for name, times in all_times.items():
            median_s = statistics.median(times)
            results.setdefault(name, {}).update(median_s=median_s, tokens_per_s=tokens / median_s,
                                                cpu_s=statistics.median(cpu_times[name][args.warmup:]))
        # openr2 over its floor: medians, the median of per-round ratios (robust to a slow spell hitting one
        # round) and the same in CPU time (robust to being descheduled on a shared machine)
        vs_floor = results[ours_key]["median_s"] / results[FLOOR]["median_s"]
        vs_floor_paired = statistics.median(o / f for o, f in zip(all_times[ours_key], all_times[FLOOR]))
        vs_floor_cpu = results[ours_key]["cpu_s"] / results[FLOOR]["cpu_s"]

    ratio = results[ours_key]["tokens_per_s"] / results[ref_key]["tokens_per_s"]
    print()
    print(f"| {'side':<32} | {'median s':>9} | {'CPU s':>7} | {'tokens/s':>9} | {'vs transformers':>15} |")
    print(f"|{'-' * 34}|{'-' * 11}|{'-' * 9}|{'-' * 11}|{'-' * 17}|")
    for name, r in results.items():
        rel = r["tokens_per_s"] / results[ref_key]["tokens_per_s"]
        print(f"| {name:<32} | {r['median_s']:>9.4f} | {r['cpu_s']:>7.3f} | {r['tokens_per_s']:>9.0f} | "
              f"{rel:>14.2f}x |")
    print("(CPU s: CPU-seconds of this process per run, all its threads, median)")
    print()
    # Both sides at their best: also compare with whichever transformers row was faster this run.
    best_ref = max((n for n in results if n.startswith("transformers")), key=lambda n: results[n]["tokens_per_s"])
    ratio_best = results[ours_key]["tokens_per_s"] / results[best_ref]["tokens_per_s"]
    print(f"ratio openr2/transformers (naive/grouped vs sdpa/{experts_impl}): {ratio:.2f}x;"
          f" vs the faster transformers row ({best_ref}): {ratio_best:.2f}x")
    ceiling = results[FLOOR]["tokens_per_s"] / results[ref_key]["tokens_per_s"]
    print(f"ceiling: openr2's {n_kernel_calls} matmul/attention kernel calls alone take "
          f"{results[FLOOR]['median_s']:.4f} s ({results[FLOOR]['median_s'] / results[ours_key]['median_s']:.0%} of "
          f"its forward), so an implementation with no work besides them would reach {ceiling:.2f}x")
    print(f"openr2 over its floor: {vs_floor:.3f}x (median of per-round ratios {vs_floor_paired:.3f}x; "
          f"in CPU time {vs_floor_cpu:.3f}x)")
    print(json.dumps({
        "bench": "forward", "model": "bench_moe", "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
        "device": "cpu", "threads": threads, "runs": args.runs, "torch": torch.__version__,
        "transformers": transformers.__version__, "ratio": round(ratio, 4),
        "ratio_vs_best_transformers": round(ratio_best, 4), "ceiling_ratio": round(ceiling, 4),
        "vs_floor": round(vs_floor, 4), "vs_floor_paired": round(vs_floor_paired, 4),
        "vs_floor_cpu": round(vs_floor_cpu, 4),
        "other_load": None if other_frac is None else round(other_frac, 3),
        "rows": {n: {"median_s": round(r["median_s"], 5), "cpu_s": round(r["cpu_s"], 5),
                     "tokens_per_s": round(r["tokens_per_s"], 1),
                     **({k: float(f"{r[k]:.3g}") for k in ("max_abs_diff", "mean_abs_diff") if k in r})}
              for n, r in results.items()},
    }))


def cpu_timed(rows: dict) -> tuple[dict, dict]:
    """(rows whose every call also records this process's CPU-seconds, name -> those CPU-seconds in call
    order, warm-up calls first)."""
    cpu: dict = {name: [] for name in rows}

    def wrap(name, fn):
        def run():
            t0 = time.process_time()
            fn()
            cpu[name].append(time.process_time() - t0)
        return run

    return {name: wrap(name, fn) for name, fn in rows.items()}, cpu


if __name__ == "__main__":
    main()
