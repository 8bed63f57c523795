"""Engine: does the latent cache, continuous batching and prefix caching pay off, measured side by side?

One ~12M-parameter MoE+MLA model (`openr2.presets.small_moe()`: 6 layers, hidden 256, 16 experts top-2),
float32, CPU, random perturbed weights, shared by both sides through one HF-layout checkpoint.
  (a) decode tokens/s at batch 1, greedy: openr2's engine (eager, and with its compiled decode step) vs
      transformers' `generate` (its defaults: DynamicCache, sdpa), same prompt, same number of new tokens;
      each side at its best thread count.
  (b) aggregate tokens/s of 32 concurrent requests vs the same 32 requests one at a time (openr2).
  (c) time to first token of a 4,096-token prompt: prefix-cache hit vs cold (openr2).
  (d) KV-cache bytes per token of the engine's allocated pool vs an MHA-equivalent cache.
  (e) one decode step at long contexts (4K, 16K, 64K, 128K; batch 1 and 4) over the paged latent cache,
      the absorbed attention reading the pool in place through the block tables (engine/paged_attention.py)
      vs the gather reference (each row's whole context copied out first, as before), eager and compiled,
      with the bytes each step's attention reads. The cache state is built directly (random latents in
      shuffled blocks of a pool sized for it): prefilling 128K tokens would take minutes on a small CPU.
Greedy tokens of (a) are checked equal on both sides before timing.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/engine.py [--new-tokens 128 --runs 3]
      OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/engine.py --sections e   (the long-context steps only)
Prints a table per question, the ratios against their targets, and a final JSON line.
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
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

import transformers  # noqa: E402

from bench.common import time_rows  # noqa: E402
from openr2.checkpoints import load_model  # noqa: E402
from openr2.engine import compiled  # noqa: E402
from openr2.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from openr2.engine.kv_cache import KVPool  # noqa: E402
from openr2.engine.sampling import SamplingParams  # noqa: E402
from openr2.model.accounting import model_stats  # noqa: E402
from openr2.model.transformer import build_model  # noqa: E402
from openr2.presets import small_moe  # noqa: E402


def make_checkpoint(path: str, seed: int = 0):
    config = small_moe()
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**config.to_hf())).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # transformers' init leaves norms at 1 and the router at zero: nudge everything
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    hf.save_pretrained(path)
    return hf


def median_time(fn, runs: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def new_engine(model, **options) -> LLMEngine:
    return LLMEngine(model, None, EngineConfig(**{"kv_cache_bytes": 64 << 20, **options}))


def engine_generate(engine: LLMEngine, prompts: list[list[int]], new_tokens: int, concurrent: bool = True):
    """Greedy completions of all prompts (together, or one after another) on an idle engine."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    done = {}
    groups = [list(enumerate(prompts))] if concurrent else [[(i, p)] for i, p in enumerate(prompts)]
    for group in groups:
        for i, prompt in group:
            engine.add_request(str(i), prompt, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
    return [done[str(i)] for i in range(len(prompts))]


def hf_generate(hf, ids: torch.Tensor, new_tokens: int) -> list[int]:
    out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def bench_decode(ours, hf, prompt, new_tokens, runs, thread_options, int8=None):
    """(a): best thread count per side; tokens/s = new tokens / wall time of the whole generation.

    openr2 runs twice: eager, and with the compiled decode step (EngineConfig(compile=True)), whose
    one-time compilation happens in the warm-up and is reported, not timed. The sides alternate within each
    round, so a slow spell of the (shared) machine lands on all of them; medians over the rounds."""
    rows, compile_s = {}, None
    hf_ids = torch.tensor([prompt])
    # the pools are allocated once, outside the timing, as a server would
    engines = {"openr2": new_engine(ours), "openr2 compiled": new_engine(ours, compile=True)}
    if int8 is not None:  # another model (its own weights): its tokens are compared, not required equal
        engines["openr2 int8 compiled"] = new_engine(int8, compile=True)
    sides = {name: (lambda e=engine: engine_generate(e, [prompt], new_tokens)[0]) for name, engine in engines.items()}
    sides["transformers"] = lambda: hf_generate(hf, hf_ids, new_tokens)
    for threads in thread_options:
        torch.set_num_threads(threads)
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine_generate(engine, [prompt], 8)  # warm-up (and compilation, the first time)
            if name == "openr2 compiled" and compile_s is None:
                compile_s = time.perf_counter() - t0
        hf_generate(hf, hf_ids, 8)
        times: dict[str, list[float]] = {name: [] for name in sides}
        tokens = {}
        for _ in range(runs):
            for name, fn in sides.items():
                t0 = time.perf_counter()
                tokens[name] = fn()
                times[name].append(time.perf_counter() - t0)
        for name in engines:
            if name == "openr2 int8 compiled":
                same = next((i for i, (a, b) in enumerate(zip(tokens[name], tokens["transformers"])) if a != b),
                            len(tokens[name]))
                print(f"int8 greedy tokens: the first {same} of {len(tokens[name])} equal float32's (a random "
                      f"model's near-tied logits; bench/quant.py measures int8 quality on the demo)")
            elif tokens[name] != tokens["transformers"]:
                raise SystemExit(f"FAIL: {name} greedy tokens differ at {threads} threads:\n{tokens[name]}\n"
                                 f"{tokens['transformers']}")
        rows[threads] = {name: new_tokens / statistics.median(t) for name, t in times.items()}
    best = {name: max(rows, key=lambda t: rows[t][name]) for name in sides}
    return rows, best, compile_s


def _long_context_step(model, step, batch: int, context: int, runs: int, block_size: int, gen) -> dict:
    """Median ms of one decode step, eager and compiled, each read, for `batch` rows of `context` cached
    tokens plus one new token, over a pool holding exactly that state (blocks in shuffled order)."""
    config = model.config
    per_row = -(-(context + 1) // block_size)
    pool = KVPool(config, batch * per_row, block_size)
    pool.c_kv.normal_(generator=gen)
    pool.k_rope.normal_(generator=gen)
    tables = torch.randperm(pool.num_blocks, generator=gen).view(batch, per_row).tolist()
    ids = torch.randint(0, config.vocab_size, (batch, 1), generator=gen)
    positions = torch.full((batch, 1), context)
    last = torch.zeros(batch, dtype=torch.long)

    def eager(read):
        view = pool.view(tables, [context] * batch, [1] * batch, read=read)  # built per step, as the runner does
        return model(ids, positions, cache=view, attn_impl="absorbed", logits_index=last)

    def compiled_step(read):
        view = pool.view(tables, [context] * batch, [1] * batch)
        return step(model, ids, positions, *view.decode_args(), read=read)[:, 0]

    fns = {f"{kind} {read}": (lambda fn=fn, read=read: fn(read))
           for kind, fn in (("eager", eager), ("compiled", compiled_step)) for read in ("gather", "blocks")}
    with torch.inference_mode():
        outs = {name: fn() for name, fn in fns.items()}  # also compiles, the first time
        want = outs["eager gather"]
        for name, out in outs.items():  # the same logits whichever read and path (rounding only)
            err = (out - want).abs().max().item()
            if err > 1e-3 * want.abs().max().item():
                raise SystemExit(f"FAIL: {name} logits differ from eager gather's by {err:.3g} at context {context}")
        times, _ = time_rows(fns, runs, warmup=1)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def bench_long_context(contexts: list[int], batches: list[int], runs: int, block_size: int = 64) -> dict:
    """(e): one decode step at each context and batch: the absorbed read in place ("blocks") vs the gather
    reference, eager (the runner's path) and compiled (decode_step under torch.compile: one graph per read
    for all shapes, as CompiledDecode's several-row path)."""
    config = dataclasses.replace(small_moe(), max_position_embeddings=max(contexts) + block_size)
    model = build_model(config, seed=0).eval()
    per_token = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 4  # float32
    step = compiled._compile_decode_step()
    gen = torch.Generator().manual_seed(0)
    names = ["eager gather", "eager blocks", "compiled gather", "compiled blocks"]
    rows, result = [], []
    for batch in batches:
        for context in contexts:
            med = _long_context_step(model, step, batch, context, runs, block_size, gen)
            attended = batch * (context + 1) * per_token
            rows.append((batch, context, attended, med))
            result.append({"batch": batch, "context": context, "attended_bytes": attended,
                           **{name.replace(" ", "_") + "_ms": round(med[name], 3) for name in names}})
            print(f"  batch {batch}, context {context}: " + ", ".join(f"{n} {med[n]:.2f} ms" for n in names),
                  flush=True)
    print(f"\n(e) one decode step at long context, {torch.get_num_threads()} threads, small_moe "
          f"({config.num_hidden_layers} layers, C {config.kv_lora_rank} + R {config.qk_rope_head_dim}, float32, "
          f"blocks of {block_size} in shuffled pool order); ms per step, median of {runs}")
    print("| batch | context | attended MB | " + " | ".join(names) + " | gather/blocks eager | compiled |")
    print("|---|---|---|" + "---|" * (len(names) + 2))
    for batch, context, attended, med in rows:
        print(f"| {batch} | {context:,} | {attended / 1e6:.1f} | " + " | ".join(f"{med[n]:.2f}" for n in names)
              + f" | {med['eager gather'] / med['eager blocks']:.2f}x"
              + f" | {med['compiled gather'] / med['compiled blocks']:.2f}x |")
    for batch in batches:  # growth with the attended bytes, shortest to longest context
        mine = [r for r in rows if r[0] == batch]
        (_, c0, b0, m0), (_, c1, b1, m1) = mine[0], mine[-1]
        print(f"batch {batch}, {c0:,} -> {c1:,}: added ms per attended MB: "
              + ", ".join(f"{n} {(m1[n] - m0[n]) / ((b1 - b0) / 1e6):.3f}" for n in names))
    return {"block_size": block_size, "threads": torch.get_num_threads(), "steps": result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=32)
    ap.add_argument("--long-prompt", type=int, default=4096)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts tried in (a)")
    ap.add_argument("--int8", action="store_true", help="(a): also the int8-quantized model, compiled")
    ap.add_argument("--sections", nargs="+", default=list("abcde"), choices=list("abcde"),
                    help="which questions to run")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 131072], help="(e)")
    ap.add_argument("--long-batches", type=int, nargs="+", default=[1, 4], help="(e): rows per step")
    args = ap.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(f"# engine bench: small_moe ({model_stats(small_moe()).total_params / 1e6:.1f}M params), float32 CPU; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, runs {args.runs} (median)")

    with tempfile.TemporaryDirectory() as ckpt:
        hf = make_checkpoint(ckpt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' V3 config announces an MTP layer it never saves
            ours = load_model(ckpt)
            int8 = None
            if args.int8:
                from openr2.quant.checkpoint import quantize_model

                int8 = quantize_model(load_model(ckpt), "int8")
    vocab = ours.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    result = {"bench": "engine", "model": "small_moe", "torch": torch.__version__,
              "transformers": transformers.__version__}

    if "a" in args.sections:
        # (a) batch-1 decode
        prompt = torch.randint(0, vocab, (32,), generator=gen).tolist()
        rows, best, compile_s = bench_decode(ours, hf, prompt, args.new_tokens, args.runs, args.threads, int8)
        at_best = {name: rows[t][name] for name, t in best.items()}
        ratio_eager = at_best["openr2"] / at_best["transformers"]
        ratio_a = at_best["openr2 compiled"] / at_best["transformers"]
        print(f"\n(a) batch-1 greedy decode, 32-token prompt, {args.new_tokens} new tokens (tokens/s)")
        names = list(rows[args.threads[0]])
        print("| threads | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for t, r in rows.items():
            print(f"| {t} | " + " | ".join(f"{r[n]:.1f}" for n in names) + " |")
        print(f"best: openr2 compiled {at_best['openr2 compiled']:.1f} ({best['openr2 compiled']} thr; compiling took "
              f"{compile_s:.0f} s once), eager {at_best['openr2']:.1f} ({best['openr2']} thr) vs transformers "
              f"{at_best['transformers']:.1f} ({best['transformers']} thr): {ratio_a:.2f}x compiled, "
              f"{ratio_eager:.2f}x eager (target >= 5x)")
        result["a_decode"] = {"rows": rows, "best_threads": best, "compile_s": round(compile_s, 1),
                              "ratio": round(ratio_a, 3), "ratio_eager": round(ratio_eager, 3)}
        if int8 is not None:
            ratio_int8 = at_best["openr2 int8 compiled"] / at_best["transformers"]
            print(f"int8 compiled: {at_best['openr2 int8 compiled']:.1f} tok/s, {ratio_int8:.2f}x transformers (float32)")
            result["a_decode"]["ratio_int8"] = round(ratio_int8, 3)

    torch.set_num_threads(max(args.threads))
    threads = torch.get_num_threads()
    if "b" in args.sections:
        # (b) continuous batching
        prompts = [torch.randint(0, vocab, (int(n),), generator=gen).tolist()
                   for n in torch.randint(16, 64, (args.concurrent,), generator=gen)]
        new = 64
        engine = new_engine(ours, enable_prefix_caching=False)  # the same prompts run twice: no cache hits
        t_conc, conc = median_time(lambda: engine_generate(engine, prompts, new), args.runs)
        t_seq, seq = median_time(lambda: engine_generate(engine, prompts, new, concurrent=False), 1)
        if conc != seq:
            raise SystemExit("FAIL: concurrent and one-at-a-time tokens differ")
        total = args.concurrent * new
        ratio_b = t_seq / t_conc
        print(f"\n(b) {args.concurrent} requests x {new} new tokens, {threads} threads: concurrent "
              f"{total / t_conc:.0f} tok/s vs one at a time {total / t_seq:.0f} tok/s: {ratio_b:.2f}x (target >= 4x)")
        result["b_batching"] = {"concurrent_tok_s": total / t_conc, "sequential_tok_s": total / t_seq,
                                "threads": threads, "ratio": round(ratio_b, 3)}

    if "c" in args.sections or "d" in args.sections:
        # (c) prefix-cache hit vs cold time to first token
        long_prompt = torch.randint(0, vocab, (args.long_prompt,), generator=gen).tolist()
        one = SamplingParams(temperature=0, max_tokens=1)
        colds, hits = [], []
        for _ in range(args.runs):
            engine = new_engine(ours, num_blocks=256)  # a fresh, empty prefix cache
            t0 = time.perf_counter()
            cold = list(engine.stream(long_prompt, one))[-1]
            colds.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            hit = list(engine.stream(long_prompt, one))[-1]
            hits.append(time.perf_counter() - t0)
            assert hit.outputs[0].token_ids == cold.outputs[0].token_ids and cold.usage.cached_prompt_tokens == 0
        t_cold, t_hit = statistics.median(colds), statistics.median(hits)
        ratio_c = t_hit / t_cold
        print(f"\n(c) TTFT of a {args.long_prompt}-token prompt, {threads} threads: cold {t_cold * 1e3:.0f} ms, "
              f"prefix hit {t_hit * 1e3:.1f} ms ({hit.usage.cached_prompt_tokens} tokens cached): "
              f"{ratio_c:.1%} (target <= 10%)")
        result["c_prefix_ttft"] = {"cold_s": t_cold, "hit_s": t_hit, "cached_tokens": hit.usage.cached_prompt_tokens,
                                   "ratio": round(ratio_c, 4)}

    if "d" in args.sections:
        # (d) cache bytes per token, from the allocated pool
        pool = engine.pool
        config = ours.config
        per_token = pool.nbytes / (pool.num_blocks * pool.block_size)
        elem = pool.c_kv.element_size()
        mha = 2 * config.num_attention_heads * config.qk_nope_head_dim * config.num_hidden_layers * elem
        theory = model_stats(config).kv_ratio
        print(f"\n(d) KV cache per token (all {config.num_hidden_layers} layers, float32): pool {per_token:.0f} B vs "
              f"MHA-equivalent {mha} B: {mha / per_token:.2f}x smaller (theory {theory:.2f}x)")
        result["d_kv_bytes"] = {"pool_bytes_per_token": per_token, "mha_bytes_per_token": mha,
                                "ratio": round(mha / per_token, 3), "theory": round(theory, 3)}
    if "e" in args.sections:
        result["e_long_context"] = bench_long_context(args.contexts, args.long_batches, args.runs)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
