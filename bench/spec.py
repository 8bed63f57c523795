"""Speculative decoding: does drafting with the model's own MTP module pay, measured side by side?

The bundled demo model (openr2/assets/openr2-demo: 5 layers + 1 trained MTP module, float32, CPU), greedy,
on held-out worded arithmetic questions and small talk through its chat template, both sides compiled
(EngineConfig.compile; the compile happens before timing). Sides are timed in interleaved rounds (each round
runs every side), and the share of the machine other processes took meanwhile is printed: on a shared machine
read the speed-ups (medians of per-round ratios), not the absolute rates.
  (a) batch-1 decode tokens/s: no speculation vs speculative_config mtp:k (k = 1, 2, 3) and ngram:3, each at
      its best thread count; acceptance rate (accepted / drafted tokens) and tokens per step.
      Outputs are checked equal to the run without speculation, token for token, before anything is timed.
  (b) the cost of a step k + 1 tokens wide (a token and k drafts) over a 1-token step: the compiled decode
      step alone, one row, k = 1, 2, 3, and the decode step fused with the first MTP draft step (one
      speculative round of mtp:k at width k + 1); speculation pays only if these stay near 1.
  (c) 8 and 32 concurrent requests: aggregate tokens/s with mtp:k vs without.
  (d) (with --only d) where a batch-1 step's time goes, off vs mtp:1: the engine thread's CPU time per
      step in the compiled call, the runner, sampling, drafting and the policy.

On a machine other processes load heavily, `--clock cpu --threads 1` times this process's CPU seconds (what
each side costs, without the time others held the CPU; caches are still shared, so it is not a quiet machine).

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/spec.py [--runs 5 --threads 1,2 --only a,b,c --quick]
      [--clock cpu --threads 1]
Prints a table per question and a final JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from bench.common import busy_cpu_s, cpu_name, other_load, run_requests  # noqa: E402
from openr2.chat_format import encode_chat  # noqa: E402
from openr2.checkpoints import load_model  # noqa: E402
from openr2.engine.compiled import compiled_decode_draft_step, compiled_decode_step  # noqa: E402
from openr2.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from openr2.engine.kv_cache import KVPool  # noqa: E402
from openr2.engine.sampling import SamplingParams  # noqa: E402
from openr2.tokenizer import Tokenizer  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "openr2", "assets", "openr2-demo")
CLOCK = [time.perf_counter]  # --clock cpu: time.process_time
QUESTIONS = ["What is 347+589?", "Subtract 199 from 512.", "Compute 806 - 327.", "hi there",
             "What do you get when you add 64 and 958?", "How much is 731 minus 48?"]




def prompts(tokenizer, count: int) -> list[dict]:
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    return [{"prompt_token_ids": encode_chat([{"role": "user", "content": q}], tokenizer)} for q in qs]


def engine_for(model, tokenizer, spec, max_num_seqs: int = 64) -> LLMEngine:
    """A compiled engine, warmed up (its compiled steps, speculative widths included, built or loaded now)."""
    engine = LLMEngine(model, tokenizer, EngineConfig(compile=True, speculative_config=spec, kv_cache_bytes=64 << 20,
                                                      max_num_seqs=max_num_seqs))
    engine.warm_up()
    return engine


def measure(model, tokenizer, specs, batches, params, threads, runs) -> dict:
    """{spec: {"tok_s", "threads", "speedup", "acceptance", "tokens_per_step"}} for bursts of requests (each
    batch added at once and drained), every spec at its best thread count.

    Every engine is built, compiled and run over every batch at every thread count first (outputs checked
    equal to the first spec's); then the timed rounds interleave the specs (round r: each thread count,
    each spec), so that a slow spell of a shared machine lands on all of them. tok_s: all tokens over the
    median round; speedup: the median over rounds of the first spec's round time over this one's, each at
    its best thread count; decode_*: the same after each burst's last first token (the prompts' passes
    left out); the load other processes put on the machine meanwhile is printed."""
    rows = max(len(batch) for batch in batches)  # the engines warm up the compiled shapes of this many rows
    engines = {str(spec): engine_for(model, tokenizer, spec, rows) for spec in specs}
    reference = None
    for name, engine in engines.items():
        for t in threads:
            torch.set_num_threads(t)
            ids = [run_requests(engine, batch, params)[1] for batch in batches]
            if reference is None:
                reference = ids
            elif ids != reference:
                raise SystemExit(f"{name}: outputs differ from the run without speculation")
    num_tokens = sum(len(i) for batch in reference for i in batch)
    num_requests = sum(len(batch) for batch in batches)
    stats_before = {name: dataclasses.replace(e.spec_stats) for name, e in engines.items()}
    times = {(name, t): [] for name in engines for t in threads}
    decode_times = {(name, t): [] for name in engines for t in threads}  # after each request's first token
    before, start = busy_cpu_s(), time.perf_counter()
    for _ in range(runs):
        for t in threads:
            torch.set_num_threads(t)
            for name, engine in engines.items():
                total = first = 0.0
                for batch in batches:
                    first_token_s = []
                    total += run_requests(engine, batch, params, first_token_s, CLOCK[0])[0]
                    first += max(first_token_s)
                times[name, t].append(total)
                decode_times[name, t].append(total - first)
    load = other_load(before, busy_cpu_s(), time.perf_counter() - start)
    if load is not None:
        print(f"# other processes used {load[0]:.1f} CPU-s during timing ({load[1]:.0%} of the machine)")
    best = {name: min(threads, key=lambda t: statistics.median(times[name, t])) for name in engines}
    first = next(iter(engines))
    out = {}
    for name, engine in engines.items():
        s, b = engine.spec_stats, stats_before[name]
        drafts, accepted, drafted = (s.num_drafts - b.num_drafts, s.num_accepted_tokens - b.num_accepted_tokens,
                                     s.num_draft_tokens - b.num_draft_tokens)
        mine, base = times[name, best[name]], times[first, best[first]]
        decode_mine, decode_base = decode_times[name, best[name]], decode_times[first, best[first]]
        out[name] = {"tok_s": num_tokens / statistics.median(mine), "threads": best[name],
                     "speedup": statistics.median(x / y for x, y in zip(base, mine)),
                     "decode_tok_s": (num_tokens - num_requests) / statistics.median(decode_mine),
                     "decode_speedup": statistics.median(x / y for x, y in zip(decode_base, decode_mine)),
                     "acceptance": accepted / drafted if drafted else 0.0,
                     "tokens_per_step": 1 + accepted / drafts if drafts else 1.0,
                     "load": load[1] if load else None}
    return out


@torch.inference_mode()
def step_widths(model, widths, threads, rounds=30, repeats=20) -> dict:
    """Median time of the compiled steps alone, one row over a 120-token context, per (step, width): the
    decode step, and the decode step fused with the first MTP draft step (a speculative round with mtp:1
    at width 2). The row's tokens are distinct: one token in every position would route to the same experts,
    as a real step does not. Rounds interleave every (step, width); the best thread count of each is kept."""
    L = model.config.num_hidden_layers
    pool = KVPool(model.config, num_blocks=8, block_size=64, num_layers=L + len(model.mtp))
    steps = {"decode": compiled_decode_step(model)}
    if len(model.mtp):
        steps["decode+draft"] = compiled_decode_draft_step(model)
    cases = {}
    for name, step in steps.items():
        for width in widths:
            context = 120
            view = pool.view([[3, 5]], [context - width], [width])
            *cache, block_size = view.decode_args()
            positions = (context - width + torch.arange(width))[None]
            ids = torch.tensor([[17, 301, 45, 260][:width]])  # distinct tokens: the MoE routes them apart
            step(ids, positions, *cache, block_size=block_size)  # loads or compiles its package
            cases[name, width] = (step, (ids, positions, *cache), block_size)
    times = {(key, t): [] for key in cases for t in threads}
    for _ in range(rounds):
        for t in threads:
            torch.set_num_threads(t)
            for key, (step, args, block_size) in cases.items():
                for _ in range(repeats):
                    start = CLOCK[0]()
                    step(*args, block_size=block_size)
                    times[key, t].append(CLOCK[0]() - start)
    return {key: min(statistics.median(times[key, t]) for t in threads) for key in cases}


PARTS = {"step": ("engine", "step"), "compiled call": ("compiled", "__call__"), "runner.run": ("runner", "run"),
         "sample+commit": ("engine", "_sample"), "output": ("engine", "_output"), "propose": ("spec", "propose"),
         "policy.choose": ("policy", "choose"), "policy.record": ("policy", "record"), "runner.draft": ("runner", "draft")}


def step_parts(model, tokenizer, params, specs, rounds=3) -> dict:
    """(d) Where a step's time goes at batch 1, one thread: the engine thread's CPU microseconds per engine
    step in each part (the methods of PARTS wrapped with a timer; nested parts are included in their callers),
    best of `rounds` rounds over all questions, prefill steps included; and per committed token."""
    from openr2.engine import compiled, engine, runner, speculative

    owners = {"engine": engine.LLMEngine, "compiled": compiled.CompiledStep, "runner": runner.ModelRunner,
              "spec": speculative.Speculator, "policy": speculative.SpecPolicy}
    spent: dict[str, int] = {}
    originals = []
    for part, (owner, name) in PARTS.items():
        cls = owners[owner]
        fn = getattr(cls, name)
        originals.append((cls, name, fn))

        def timed(*args, _fn=fn, _part=part, **kwargs):
            start = time.thread_time_ns()
            try:
                return _fn(*args, **kwargs)
            finally:
                spent[_part] = spent.get(_part, 0) + time.thread_time_ns() - start

        setattr(cls, name, timed)
    torch.set_num_threads(1)
    try:
        engines = {str(spec): engine_for(model, tokenizer, spec, 1) for spec in specs}
        batches = [[p] for p in prompts(tokenizer, len(QUESTIONS))]
        best = {}
        for _ in range(rounds):
            for name, eng in engines.items():
                spent.clear()
                num_steps = num_tokens = 0
                for batch in batches:
                    for i, p in enumerate(batch):
                        eng.add_request(f"r{i}", p, params)
                    while eng.has_unfinished_requests():
                        num_steps += 1
                        num_tokens += sum(len(o.outputs[0].token_ids_delta) for o in eng.step())
                row = {part: ns / num_steps / 1e3 for part, ns in spent.items()}
                row["steps"], row["per token"] = num_steps, spent["step"] / num_tokens / 1e3
                if name not in best or row["step"] < best[name]["step"]:
                    best[name] = row
    finally:
        for cls, name, fn in originals:
            setattr(cls, name, fn)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="timed rounds (each runs every side)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--quick", action="store_true", help="batch 1 with mtp:1 and mtp:2 only, no (c)")
    ap.add_argument("--only", default="a,b,c", help="the questions to run, e.g. a,b")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: time this process's CPU seconds instead of wall time (a machine other processes load "
                         "heavily; one thread only, since a second thread's CPU seconds add up)")
    args = ap.parse_args()
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
        if args.threads != "1":
            ap.error("--clock cpu times one thread: pass --threads 1")
    only = set(args.only.split(","))
    threads = [int(t) for t in args.threads.split(",")]
    model = load_model(DEMO)
    tokenizer = Tokenizer.from_pretrained(DEMO)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    print(f"# bench/spec.py on {cpu_name()}, torch {torch.__version__}, threads {threads}, demo model, greedy, "
          f"clock {args.clock}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    specs = [None, "mtp:1", "mtp:2"] if args.quick else [None, "mtp:1", "mtp:2", "mtp:3", "ngram:3"]
    result = {"cpu": cpu_name()}
    start = time.perf_counter()
    if "a" in only:
        batch1 = measure(model, tokenizer, specs, [[p] for p in prompts(tokenizer, len(QUESTIONS))], params,
                         threads, args.runs)
        print_batch1(batch1, result)
    if "b" in only:
        print_widths(step_widths(model, [1, 2, 3, 4], threads), result)
    if "d" in only:
        parts = step_parts(model, tokenizer, params, [None, "mtp:1"])
        print("\n(d) where a step's time goes, batch 1, one thread: engine-thread CPU us per engine step (nested "
              "parts inside their callers; prefill steps included)")
        print(f"{'part':<15}" + "".join(f"{'off' if n == 'None' else n:>10}" for n in parts))
        for part in ["steps", *PARTS, "per token"]:
            print(f"{part:<15}" + "".join(f"{row.get(part, 0):>10.1f}" for row in parts.values()))
        result["d_step_parts_us"] = parts
    if "c" in only and not args.quick:
        print("\n(c) concurrent requests, compiled, aggregate tokens/s")
        print(f"{'requests':>8} {'speculation':<12} {'tok/s':>8} {'speed-up':>9} {'acceptance':>11}")
        result["c_concurrent"] = {}
        for count in (8, 32):
            rows = measure(model, tokenizer, [None, "mtp:1", "mtp:2"], [prompts(tokenizer, count)], params,
                           threads, args.runs)
            for spec, row in rows.items():
                print(f"{count:>8} {spec if spec != 'None' else 'off':<12} {row['tok_s']:>8.0f} "
                      f"{row['speedup']:>8.2f}x {row['acceptance']:>11.3f}")
                result["c_concurrent"][f"{count}:{spec}"] = row
    result["wall_s"] = time.perf_counter() - start
    print(json.dumps(result))
    return 0


def print_batch1(batch1: dict, result: dict) -> None:
    print("\n(a) batch-1 decode, compiled, best thread count (one question at a time, all questions; "
          "decode: after the first token)")
    print(f"{'speculation':<12} {'tok/s':>8} {'speed-up':>9} {'decode tok/s':>13} {'speed-up':>9} "
          f"{'acceptance':>11} {'tokens/step':>12} {'threads':>8}")
    result["a_batch1"] = {}
    for spec, row in batch1.items():
        print(f"{spec if spec != 'None' else 'off':<12} {row['tok_s']:>8.0f} {row['speedup']:>8.2f}x "
              f"{row['decode_tok_s']:>13.0f} {row['decode_speedup']:>8.2f}x "
              f"{row['acceptance']:>11.3f} {row['tokens_per_step']:>12.2f} {row['threads']:>8}")
        result["a_batch1"][spec] = row


def print_widths(widths: dict, result: dict) -> None:
    base_step = widths["decode", 1]
    print("\n(b) compiled steps, one row, k + 1 tokens vs the 1-token decode step (decode+draft: with the first "
          "MTP draft step in the same call)")
    print(f"{'step':<13} {'tokens':>6} {'ms':>8} {'ratio':>7}")
    for (name, w), sec in widths.items():
        print(f"{name:<13} {w:>6} {sec * 1e3:>8.3f} {sec / base_step:>6.2f}x")
    result["b_step_ratio"] = {f"{name}:{w}": sec / base_step for (name, w), sec in widths.items()}


if __name__ == "__main__":
    sys.exit(main())
