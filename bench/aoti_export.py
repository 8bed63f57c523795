"""Which model configurations export their compiled decode step to AOTInductor packages (engine/aoti.py), and
which fall back to torch.compile (a warning, then minutes of compiling in every process)?

For each configuration (small hidden sizes and few layers, the attention, rope and routing shapes of real
ones), on a fresh cache directory: the decode step for one row, then for three rows (the several-rows
packages), and the decode step fused with the MTP draft where the model has MTP. Prints one JSON line per
step: exported or not (with the fall-back warning), packages on disk, build seconds, and the largest
difference of the logits from the eager step's.

--time N: then the one-row decode step of each configuration N times through its package and N times through
torch.compile (the fall-back), alternating in blocks of 10 so that load from other jobs falls on both alike:
median milliseconds per step, with the load average.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/aoti_export.py [--only NAME ...] [--time 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import statistics
import tempfile
import time
import warnings

import torch

from openr2.engine import compiled
from openr2.model.transformer import build_model
from openr2.presets import bench_moe, tiny_v2, tiny_v3


def configs() -> dict:
    v3 = dataclasses.replace(tiny_v3(), num_nextn_predict_layers=0)
    return {
        "tiny_v3 (rope 8, YaRN)": (v3, None),
        "rope 16, YaRN": (dataclasses.replace(v3, qk_rope_head_dim=16), None),
        "rope 18, no YaRN": (dataclasses.replace(v3, qk_rope_head_dim=18, rope_scaling=None), None),
        "rope 64, YaRN (V3's rope)": (dataclasses.replace(v3, qk_rope_head_dim=64), None),
        # bench/longctx.py's attention without its indexer (V3.2 models decode eagerly by design)
        "dense, 128 heads, kv_lora 512, rope 64 (longctx dims, V3)": (dataclasses.replace(
            v3, vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2, first_k_dense_replace=2,
            num_attention_heads=128, kv_lora_rank=512, q_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64,
            v_head_dim=128, rope_scaling=None), None),
        "256 experts top-8, 8 groups top-4, rope 64": (dataclasses.replace(
            v3, qk_rope_head_dim=64, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
            moe_intermediate_size=16), None),
        "V2-shaped (softmax greedy routing, no q LoRA), rope 64": (dataclasses.replace(tiny_v2(), qk_rope_head_dim=64),
                                                                   None),
        "int8, rope 64": (dataclasses.replace(v3, qk_rope_head_dim=64), "int8"),
        "MTP decode+draft, rope 64": (dataclasses.replace(tiny_v3(), qk_rope_head_dim=64), None),
        "bench_moe preset (6 layers, rope 32)": (dataclasses.replace(bench_moe(), num_nextn_predict_layers=0), None),
    }


def step_args(config, rows: int, gen: torch.Generator, block_size: int = 4, num_blocks: int = 8):
    L = config.num_hidden_layers + config.num_nextn_predict_layers  # the MTP modules write keys too
    pool_c = torch.randn(L, num_blocks * block_size, config.kv_lora_rank, generator=gen)
    pool_r = torch.randn(L, num_blocks * block_size, config.qk_rope_head_dim, generator=gen)
    lengths = torch.tensor([13, 7, 20][:rows])
    table = torch.stack([torch.randperm(num_blocks, generator=gen)[:6] for _ in range(rows)])
    positions = lengths[:, None] - 1
    write_slots = (table.gather(1, positions // block_size) * block_size + positions % block_size).flatten()
    ids = torch.randint(0, config.vocab_size, (rows, 1), generator=gen)
    return ids, positions, pool_c, pool_r, table, write_slots, torch.arange(rows)


def run(name: str, config, quant: str | None, time_steps: int, row_counts=(1, 3)) -> None:
    model = build_model(config, seed=1).eval()
    if quant:
        from openr2.quant.checkpoint import quantize_model

        quantize_model(model, quant)
    mtp = config.num_nextn_predict_layers > 0
    fn = compiled.decode_draft_step if mtp else compiled.decode_step
    cache_dir = tempfile.mkdtemp(prefix="aoti_export-")
    step = compiled.CompiledStep(model, fn, (2, 3), 4, cache_dir)
    for rows in row_counts:
        args = step_args(config, rows, torch.Generator().manual_seed(rows))
        eager_args = [a.clone() for a in args]
        start = time.perf_counter()
        with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = step(*args, block_size=4)
            seconds = time.perf_counter() - start
            want = fn(model, *eager_args, 4)
        fallback = [str(w.message) for w in caught if "not exported" in str(w.message)]
        package = next(p for ps in step._packages.values() for p in ps if p.covers(rows))
        print(json.dumps({
            "config": name, "step": fn.__name__, "rows": rows, "exported": package.loader is not False,
            "packages_on_disk": len(glob.glob(os.path.join(cache_dir, "*.pt2"))), "first_call_s": round(seconds, 1),
            "max_abs_logit_diff": float((got[0] - want[0]).abs().max()), "fallback_warning": fallback[:1],
            "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__}), flush=True)
    if time_steps:
        timing(name, model, fn, step, config, time_steps)


def timing(name: str, model, fn, step, config, n: int) -> None:
    """Median ms per one-row step: the package (or whatever CompiledStep serves) vs torch.compile."""
    args = step_args(config, 1, torch.Generator().manual_seed(5))
    fallback = compiled._private_compile(fn)
    sides = {"package": lambda: step(*args, block_size=4), "torch.compile": lambda: fallback(model, *args, block_size=4)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    load = [os.getloadavg()[0]]
    with torch.inference_mode():
        for f in sides.values():  # compile / warm
            for _ in range(3):
                f()
        for _ in range(n // 10):
            for k, f in sides.items():
                for _ in range(10):
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
    load.append(os.getloadavg()[0])
    exported = any(p.loader is not False for ps in step._packages.values() for p in ps if p.covers(1))
    print(json.dumps({"config": name, "step": fn.__name__, "rows": 1, "package_exported": exported,
                      "threads": torch.get_num_threads(), "steps_each": len(times["package"]),
                      **{f"{k}_ms_median": round(1e3 * statistics.median(v), 3) for k, v in times.items()},
                      "load_avg_1m": load}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="configurations whose name contains one of these")
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 3], help="rows of the steps exported (1, 3)")
    ap.add_argument("--time", type=int, default=0, help="time N one-row steps each: package vs torch.compile")
    args = ap.parse_args()
    for name, (config, quant) in configs().items():
        if args.only and not any(o in name for o in args.only):
            continue
        run(name, config, quant, args.time, args.rows)


if __name__ == "__main__":
    main()
