"""Speculative decoding: does drafting with the model's own MTP module pay, measured side by side?

The bundled demo model (openr2/assets/openr2-demo: 5 layers + 1 trained MTP module, float32, CPU), greedy,
on held-out worded arithmetic questions and small talk through its chat template, both sides compiled
(EngineConfig.compile; the compile happens before timing).
  (a) batch-1 decode tokens/s: no speculation vs speculative_config mtp:k (k = 1, 2, 3) and ngram:3, each at
      its best thread count; acceptance rate (accepted / drafted tokens) and tokens per step.
      Outputs are checked equal to the run without speculation, token for token, before anything is timed.
  (b) the cost of a step k + 1 tokens wide (a token and k drafts) over a 1-token step: the compiled decode
      step alone, one row, k = 1, 2, 3 (speculation pays only if this stays near 1).
  (c) 8 and 32 concurrent requests: aggregate tokens/s with mtp:k vs without.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/spec.py [--runs 3 --threads 1,2 --quick]
Prints a table per question and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from openr2.chat_format import encode_chat  # noqa: E402
from openr2.checkpoints import load_model  # noqa: E402
from openr2.engine.compiled import compiled_decode_step  # noqa: E402
from openr2.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from openr2.engine.kv_cache import KVPool  # noqa: E402
from openr2.engine.sampling import SamplingParams  # noqa: E402
from openr2.tokenizer import Tokenizer  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "openr2", "assets", "openr2-demo")
QUESTIONS = ["What is 347+589?", "Subtract 199 from 512.", "Compute 806 - 327.", "hi there",
             "What do you get when you add 64 and 958?", "How much is 731 minus 48?"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def prompts(tokenizer, count: int) -> list[dict]:
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    return [{"prompt_token_ids": encode_chat([{"role": "user", "content": q}], tokenizer)} for q in qs]


def run(engine: LLMEngine, batch: list[dict], params: SamplingParams) -> tuple[float, list[list[int]]]:
    """Seconds to finish every prompt of the batch (all added at once) and the token ids of each."""
    start = time.perf_counter()
    for i, p in enumerate(batch):
        engine.add_request(f"r{i}", p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return time.perf_counter() - start, [done[f"r{i}"] for i in range(len(batch))]


def engine_for(model, tokenizer, spec) -> LLMEngine:
    engine = LLMEngine(model, tokenizer, EngineConfig(compile=True, speculative_config=spec, kv_cache_bytes=64 << 20))
    engine.warm_up()
    return engine


def measure(model, tokenizer, specs, batches, params, threads, runs) -> dict:
    """{spec: {"tok_s", "threads", "acceptance", "tokens_per_step"}}: all tokens of the batches (each run as
    one burst of requests) over the sum of their median times, each spec at its best thread count."""
    reference, out = None, {}
    for spec in specs:
        engine = engine_for(model, tokenizer, spec)
        ids = [run(engine, batch, params)[1] for batch in batches]  # also the last warm-up
        if reference is None:
            reference = ids
        elif ids != reference:
            raise SystemExit(f"{spec}: outputs differ from the run without speculation")
        drafted_before = (engine.spec_stats.num_drafts, engine.spec_stats.num_accepted_tokens,
                          engine.spec_stats.num_draft_tokens)
        num_tokens = sum(len(i) for batch in reference for i in batch)
        best = None
        for t in threads:
            torch.set_num_threads(t)
            total = sum(statistics.median(run(engine, batch, params)[0] for _ in range(runs)) for batch in batches)
            if best is None or num_tokens / total > best[0]:
                best = (num_tokens / total, t)
        s = engine.spec_stats
        drafts, accepted, drafted = (s.num_drafts - drafted_before[0], s.num_accepted_tokens - drafted_before[1],
                                     s.num_draft_tokens - drafted_before[2])
        out[str(spec)] = {"tok_s": best[0], "threads": best[1], "acceptance": accepted / drafted if drafted else 0.0,
                          "tokens_per_step": 1 + accepted / drafts if drafts else 1.0}
    return out


@torch.inference_mode()
def step_widths(model, widths, threads, repeats=200) -> dict:
    """Median time of the compiled decode step alone, one row over a 120-token context, per width."""
    pool = KVPool(model.config, num_blocks=8, block_size=64, num_layers=model.config.num_hidden_layers)
    step = compiled_decode_step(model)
    out = {}
    for width in widths:
        context = 120
        view = pool.view([[3, 5]], [context - width], [width])
        *cache, block_size = view.decode_args()
        positions = (context - width + torch.arange(width))[None]
        ids = torch.zeros(1, width, dtype=torch.long)
        best = None
        for t in threads:
            torch.set_num_threads(t)
            for _ in range(20):
                step(ids, positions, *cache, block_size=block_size)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                step(ids, positions, *cache, block_size=block_size)
                times.append(time.perf_counter() - start)
            med = statistics.median(times)
            best = med if best is None else min(best, med)
        out[width] = best
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--quick", action="store_true", help="batch 1 with mtp:1 and mtp:2 only, no (c)")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    model = load_model(DEMO)
    tokenizer = Tokenizer.from_pretrained(DEMO)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    print(f"# bench/spec.py on {cpu_name()}, torch {torch.__version__}, threads {threads}, demo model, greedy")

    specs = [None, "mtp:1", "mtp:2"] if args.quick else [None, "mtp:1", "mtp:2", "mtp:3", "ngram:3"]
    result = {"cpu": cpu_name()}
    start = time.perf_counter()
    batch1 = measure(model, tokenizer, specs, [[p] for p in prompts(tokenizer, len(QUESTIONS))], params, threads,
                     args.runs)
    base = batch1["None"]["tok_s"]
    print("\n(a) batch-1 decode, compiled, best thread count (one question at a time, all questions)")
    print(f"{'speculation':<12} {'tok/s':>8} {'speed-up':>9} {'acceptance':>11} {'tokens/step':>12} {'threads':>8}")
    result["a_batch1"] = {}
    for spec, row in batch1.items():
        print(f"{spec if spec != 'None' else 'off':<12} {row['tok_s']:>8.0f} {row['tok_s'] / base:>8.2f}x "
              f"{row['acceptance']:>11.3f} {row['tokens_per_step']:>12.2f} {row['threads']:>8}")
        result["a_batch1"][spec] = dict(row, speedup=row["tok_s"] / base)

    widths = step_widths(model, [1, 2, 3, 4], threads)
    print("\n(b) compiled decode step, one row, k + 1 tokens vs 1 token")
    print(f"{'tokens':>6} {'ms':>8} {'ratio':>7}")
    for w, s in widths.items():
        print(f"{w:>6} {s * 1e3:>8.3f} {s / widths[1]:>6.2f}x")
    result["b_step_ratio"] = {w: s / widths[1] for w, s in widths.items()}

    if not args.quick:
        print("\n(c) concurrent requests, compiled, aggregate tokens/s")
        print(f"{'requests':>8} {'speculation':<12} {'tok/s':>8} {'speed-up':>9} {'acceptance':>11}")
        result["c_concurrent"] = {}
        for count in (8, 32):
            rows = measure(model, tokenizer, [None, "mtp:1", "mtp:2"], [prompts(tokenizer, count)], params,
                           threads, max(1, args.runs - 1))
            for spec, row in rows.items():
                speedup = row["tok_s"] / rows["None"]["tok_s"]
                print(f"{count:>8} {spec if spec != 'None' else 'off':<12} {row['tok_s']:>8.0f} {speedup:>8.2f}x "
                      f"{row['acceptance']:>11.3f}")
                result["c_concurrent"][f"{count}:{spec}"] = {"tok_s": row["tok_s"], "speedup": speedup}
    result["wall_s"] = time.perf_counter() - start
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
