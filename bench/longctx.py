"""Long-context decode: dense MLA vs DeepSeek Sparse Attention (V3.2) over the engine's paged pool.

A small model with V3.2's attention shapes (128 heads, kv_lora_rank 512, rope 64, nope 128, v 128; indexer 64
heads x 128, index_topk 2048) but a small hidden size, two layers and dense MLPs, float32. For each context (4K, 16K, 64K,
128K by default) one row's pool is filled with random latents and indexer keys (unit-variance, as the norms
leave them) in shuffled blocks of 64, and one decode step (one new token, the absorbed path, eager, as the
engine runs V3.2) is timed:
  dense  the same model with its indexers keeping every key (dense MLA; the paged in-place kernel reads the
         whole context's latents);
  dsa    sparse attention: the indexer scores every key from its indexer keys read in place by block table
         (the fused scan of engine/paged_attention.py), then only the top-k tokens' latents are gathered by
         slot (engine/kv_cache.py: PagedView.index_scores / attend_sparse);
  dsa_gather  the same with the view's read="gather": the indexer keys gathered into position order first
         and scored by model/indexer.py's separate products (the reference, and what DSA decode ran before);
  dsa_bf16  dsa with the opt-in bfloat16 indexer keys (KVPool(index_dtype=torch.bfloat16): the same keys
         rounded, the queries rounded too, scanned with AMX tiles where the CPU has them; its logits differ
         from dsa's by the rounding, printed).
Bytes read from the cache per step are counted from the shapes (per layer: dense S (C + R), DSA S Di + min(K, S)
(C + R) elements, 4 bytes each; dsa_gather also writes and re-reads a copy of the S Di indexer keys and its
[Hi, S] products, not counted; dsa_bf16 reads S Di 2-byte keys). Prefill: each prompt of --prefill-tokens
(whole prompts: 64K+ takes hours on a small CPU) through the model over the paged cache in chunks of 512, each
chunk through the MLA path the engine's runner picks (its cost model: DSA's absorbed path attends over
index_topk keys per query), dense, DSA and DSA with bf16 indexer keys; and, at every decode context S, one
512-token prefill chunk at the end of the context (positions S-512..S-1 over the random pool, the runner's
path; --chunk-contexts, default the decode contexts): the marginal cost of prompt tokens that far in, whose
sum over a prompt's chunks is its prefill time.
Cache bytes per token: dense MLA (deepseek_v3) vs V3.2 (latent + indexer key), float32 and bfloat16, and a
float32 pool with bf16 indexer keys.

Also one layer's indexer scan alone (scan, scan_bf16: the kernel over the float32 / bf16 keys), the part of the
DSA step that grows with the context.

Each later context also times the first context's DSA step again in the same interleaved rounds, so that
"DSA here / DSA at the first context" comes from one window of a shared machine's load.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/longctx.py [--contexts 4096,16384,65536,131072 --runs 5
      --prefill-tokens 4096,16384 --chunk-contexts 4096,16384,65536,131072]
      (--prefill-tokens 0 / --chunk-contexts 0 skip them)
Prints a table (ms per step: median, and best of the runs below it) and a final JSON line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from functools import partial
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from bench.common import time_rows  # noqa: E402
from openr2.engine.kv_cache import KVPool, bytes_per_token  # noqa: E402
from openr2.engine.runner import ModelRunner  # noqa: E402
from openr2.model.indexer import Indexer  # noqa: E402
from openr2.model.transformer import build_model  # noqa: E402
from openr2.presets import tiny_v32  # noqa: E402

BLOCK = 64


def config(heads):
    return dataclasses.replace(
        tiny_v32(), vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        first_k_dense_replace=2, num_attention_heads=heads, kv_lora_rank=512, q_lora_rank=256, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, index_n_heads=64, index_head_dim=128, index_topk=2048,
        max_position_embeddings=262144, rope_scaling=None, num_nextn_predict_layers=0)


def set_topk(model, k):
    for m in model.modules():
        if isinstance(m, Indexer):
            m.index_topk = k


def decode_step(model, topk, pool, table, S, read="blocks"):
    """One decode step of one row at position S (absorbed path, eager), the indexers keeping `topk` keys;
    read: the view's read implementation (kv_cache.READ_IMPLS)."""
    ids, positions = torch.tensor([[7]]), torch.tensor([[S]])

    def run():
        set_topk(model, topk)
        with torch.inference_mode():
            return model(ids, positions, cache=pool.view(table, [S], [1], read=read), attn_impl="absorbed")
    return run


def with_bf16_index(pool):
    """The same pool with its indexer keys rounded to bfloat16 (a copy of those; the latents shared), as
    KVPool(index_dtype=torch.bfloat16) stores them."""
    out = copy.copy(pool)
    out.k_index, out.index_dtype = pool.k_index.to(torch.bfloat16), torch.bfloat16
    return out


def cpu_time_rows(rows, runs, warmup):
    """time_rows (bench/common.py: interleaved rounds) by process CPU seconds per call; no load share."""
    for fn in rows.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in rows}
    for _ in range(runs):
        for name, fn in rows.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    return times, None


def scan(cfg, pool, table, S):
    """The indexer scan of one layer alone (engine/paged_attention.py's kernel over the pool's indexer keys, a
    float32 or bf16 pool), one query at position S: the part of a DSA step that grows with the context."""
    from openr2.engine import paged_attention

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, cfg.index_n_heads, cfg.index_head_dim, generator=gen)
    w = torch.randn(1, 1, cfg.index_n_heads, generator=gen)
    block_table, positions = torch.tensor(table), torch.tensor([[S]])
    return lambda: paged_attention.paged_index_scores(q, w, pool.k_index, 0, block_table, positions, S + 1, BLOCK,
                                                      cfg.index_head_dim**-0.5)


def runner_impl(cfg, mode):
    """The engine runner's per-chunk choice of MLA path for a dense (V3) or a V3.2 model of these shapes."""
    mconf = dataclasses.replace(cfg, model_type="deepseek_v3") if mode == "dense" else cfg
    return partial(ModelRunner._attn_impl, SimpleNamespace(model=SimpleNamespace(config=mconf)))


def prefill_chunk(model, topk, pool, table, S, impl, n=512):
    """One n-token prompt chunk at positions S-n..S-1 of one row over the pool (its keys before S-n cached)."""
    ids, positions = torch.randint(0, model.config.vocab_size, (1, n)), torch.arange(S - n, S)[None]

    def run():
        set_topk(model, topk)
        with torch.inference_mode():
            return model(ids, positions, cache=pool.view(table, [S - n], [n]), attn_impl=impl(n, S))
    return run


def compiled_decode_step(model, topk, pool, table, S):
    """decode_step through the engine's compiled step (engine/compiled.py: an AOTInductor package on first use)."""
    from openr2.engine.compiled import compiled_decode_step as compiled_step

    step, ids, positions = compiled_step(model), torch.tensor([[7]]), torch.tensor([[S]])

    def run():
        set_topk(model, topk)  # read when the step is exported (its first call), then part of the package
        view = pool.view(table, [S], [1])
        *cache, block_size = view.decode_args()
        with torch.inference_mode():
            return step(ids, positions, *cache, *view.index_args(), block_size=block_size)[0]
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,16384,65536,131072")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--heads", type=int, default=128, help="attention heads (the release's 128 by default)")
    ap.add_argument("--prefill-tokens", default="4096", help="whole prompts to prefill (comma-separated; 0: none)")
    ap.add_argument("--chunk-contexts", default=None,
                    help="contexts at which to time one 512-token prefill chunk (default: --contexts; 0: none)")
    ap.add_argument("--chunk-runs", type=int, default=1, help="rounds of the chunk timing (each chunk takes s)")
    ap.add_argument("--compiled", action="store_true", help="also time DSA through the compiled decode step")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time each step by this process's CPU time instead of the wall clock (with one thread, "
                         "OMP_NUM_THREADS=1: the step's own compute, not the time other processes held the CPU)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = config(args.heads)
    model = build_model(cfg, seed=0).eval()
    K, L = cfg.index_topk, cfg.num_hidden_layers
    C, R, Di = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim
    gen = torch.Generator().manual_seed(0)
    result = {"config": {"layers": L, "heads": cfg.num_attention_heads, "kv_lora_rank": C, "rope": R,
                         "index_heads": cfg.index_n_heads, "index_head_dim": Di, "index_topk": K},
              "threads": torch.get_num_threads(), "decode": [], "prefill": {}, "prefill_chunk": [],
              "cache_bytes_per_token": {}}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        result["cache_bytes_per_token"][name] = {
            "dense_mla": bytes_per_token(dataclasses.replace(cfg, model_type="deepseek_v3"), dtype),
            "dsa": bytes_per_token(cfg, dtype), "dsa_bf16_index": bytes_per_token(cfg, dtype, index_dtype=torch.bfloat16)}
    print("cache bytes per token (all layers):", result["cache_bytes_per_token"])
    print(f"{'context':>8} {'dense ms':>9} {'dsa ms':>8} {'dsa_bf16 ms':>12} {'dsa_gather ms':>14} "
          f"{'dense MB read':>14} {'dsa MB read':>12} {'dsa/first':>10} {'bf16/first':>11} {'load 1m':>8}")
    # the first context's DSA step, timed again beside each later context's rows: the ratio of the two comes
    # from one interleaved window, not from two windows of a shared machine's changing load
    first = first_bf16 = None
    for S in (int(s) for s in args.contexts.split(",")):
        blocks = -(-(S + 1) // BLOCK)
        pool = KVPool(cfg, blocks, BLOCK)
        for t in (pool.c_kv, pool.k_rope, pool.k_index):
            t.normal_(generator=gen)
        table = [torch.randperm(blocks, generator=gen).tolist()]

        pool_bf16 = with_bf16_index(pool)
        rows = {"dense": decode_step(model, 1 << 30, pool, table, S), "dsa": decode_step(model, K, pool, table, S),
                "dsa_bf16": decode_step(model, K, pool_bf16, table, S),
                "dsa_gather": decode_step(model, K, pool, table, S, read="gather"),
                "scan": scan(cfg, pool, table, S), "scan_bf16": scan(cfg, pool_bf16, table, S)}
        if args.compiled:
            rows["dsa_compiled"] = compiled_decode_step(model, K, pool, table, S)
            print(f"# {S}: compiled vs eager DSA logits, max diff "
                  f"{(rows['dsa_compiled']() - rows['dsa']()).abs().max().item():.2g}")
        if first is not None:
            rows["dsa_first"], rows["dsa_bf16_first"] = first, first_bf16
        # the two DSA reads are one function: the same logits (the fast one within float32 rounding)
        diff = (rows["dsa"]() - rows["dsa_gather"]()).abs().max().item()
        diff_bf16 = (rows["dsa"]() - rows["dsa_bf16"]()).abs().max().item()
        times, other = (cpu_time_rows if args.cpu_time else time_rows)(rows, args.runs, warmup=1)
        load = os.getloadavg()[0]
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        best = {k: 1e3 * min(v) for k, v in times.items()}  # the least disturbed run of each row
        mb = {"dense": L * S * (C + R) * 4 / 1e6, "dsa": L * (S * Di + min(K, S) * (C + R)) * 4 / 1e6,
              "dsa_bf16": L * (S * Di * 2 + min(K, S) * (C + R) * 4) / 1e6}
        vs_first = ms["dsa"] / ms.get("dsa_first", ms["dsa"])
        bf16_vs_first = ms["dsa_bf16"] / ms.get("dsa_bf16_first", ms["dsa_bf16"])
        if args.compiled:
            print(f"# {S}: dsa compiled {ms['dsa_compiled']:.2f} ms (eager {ms['dsa']:.2f})")
        print(f"{S:>8} {ms['dense']:>9.2f} {ms['dsa']:>8.2f} {ms['dsa_bf16']:>12.2f} {ms['dsa_gather']:>14.2f} "
              f"{mb['dense']:>14.1f} {mb['dsa']:>12.1f} {vs_first:>10.2f} {bf16_vs_first:>11.2f} {load:>8.2f}   "
              f"(logits max diff: dsa vs dsa_gather {diff:.2g}, dsa vs dsa_bf16 {diff_bf16:.2g}; one layer's scan "
              f"{ms['scan']:.2f} ms, bf16 {ms['scan_bf16']:.2f} ms)")
        print(f"{'best of':>8} {best['dense']:>9.2f} {best['dsa']:>8.2f} {best['dsa_bf16']:>12.2f} "
              f"{best['dsa_gather']:>14.2f} {'':>14} {'':>12} "
              f"{best['dsa'] / best.get('dsa_first', best['dsa']):>10.2f} "
              f"{best['dsa_bf16'] / best.get('dsa_bf16_first', best['dsa_bf16']):>11.2f}   "
              f"(scan {best['scan']:.2f} ms, bf16 {best['scan_bf16']:.2f} ms)")
        result["decode"].append({"context": S, "ms": ms, "best_ms": best, "mb_read": mb, "other_processes": other,
                                 "load_avg_1m": load, "dsa_vs_gather_max_logit_diff": diff,
                                 "dsa_vs_bf16_max_logit_diff": diff_bf16, "dsa_vs_first_same_window": vs_first,
                                 "dsa_bf16_vs_first_same_window": bf16_vs_first})
        first, first_bf16 = first or rows["dsa"], first_bf16 or rows["dsa_bf16"]  # keep the first pools alive
        del pool, pool_bf16
    chunk_contexts = args.contexts if args.chunk_contexts is None else args.chunk_contexts
    for S in (int(s) for s in chunk_contexts.split(",") if int(s)):
        prefill_chunk_row(result, model, cfg, S, args.chunk_runs, gen)
    prefill_prompts(result, model, cfg, [int(p) for p in args.prefill_tokens.split(",") if int(p)], gen)
    print(json.dumps(result))


def prefill_chunk_row(result, model, cfg, S, runs, gen):
    """One 512-token prefill chunk at the end of context S (prefill_chunk), dense / DSA / DSA bf16 keys."""
    K, blocks = cfg.index_topk, -(-S // BLOCK)
    pool = KVPool(cfg, blocks, BLOCK)
    for t in (pool.c_kv, pool.k_rope, pool.k_index):
        t.normal_(generator=gen)
    pool_bf16 = with_bf16_index(pool)
    table = [torch.randperm(blocks, generator=gen).tolist()]
    rows = {"dense": prefill_chunk(model, 1 << 30, pool, table, S, runner_impl(cfg, "dense")),
            "dsa": prefill_chunk(model, K, pool, table, S, runner_impl(cfg, "dsa")),
            "dsa_bf16": prefill_chunk(model, K, pool_bf16, table, S, runner_impl(cfg, "dsa"))}
    times, other = time_rows(rows, runs, warmup=0)
    s = {k: statistics.median(v) for k, v in times.items()}
    impls = {"dense": runner_impl(cfg, "dense")(512, S), "dsa": runner_impl(cfg, "dsa")(512, S)}
    load = os.getloadavg()[0]
    print(f"prefill chunk of 512 at context {S}: dense {s['dense']:.2f} s ({impls['dense']}), dsa {s['dsa']:.2f} s, "
          f"dsa_bf16 {s['dsa_bf16']:.2f} s ({impls['dsa']}); load {load:.2f}")
    result["prefill_chunk"].append({"context": S, "s": s, "impl": impls, "other_processes": other,
                                    "load_avg_1m": load})


def prefill_prompts(result, model, cfg, lengths, gen):
    """Whole prompts in chunks of 512 through the runner's per-chunk MLA path, dense / DSA / DSA bf16 keys."""
    K = cfg.index_topk
    for P in lengths:
        prompt = torch.randint(0, cfg.vocab_size, (P,), generator=gen)
        result["prefill"][P] = {}
        for mode, topk, index_dtype in (("dense", 1 << 30, None), ("dsa", K, None), ("dsa_bf16", K, torch.bfloat16)):
            set_topk(model, topk)
            pool = KVPool(cfg, -(-P // BLOCK), BLOCK, index_dtype=index_dtype)
            table = [list(range(pool.num_blocks))]
            impl = runner_impl(cfg, "dense" if mode == "dense" else "dsa")
            t0, impls = time.perf_counter(), []
            with torch.inference_mode():
                for s in range(0, P, 512):
                    n = min(512, P - s)
                    impls.append(impl(n, s + n))
                    model(prompt[None, s : s + n], torch.arange(s, s + n)[None], cache=pool.view(table, [s], [n]),
                          attn_impl=impls[-1])
            load = os.getloadavg()[0]
            result["prefill"][P][mode] = {"s": time.perf_counter() - t0, "chunks": impls, "load_avg_1m": load}
            print(f"prefill {P} tokens ({mode}): {result['prefill'][P][mode]['s']:.2f} s, chunks "
                  f"{dict((i, impls.count(i)) for i in impls)}, load {load:.2f}", flush=True)


if __name__ == "__main__":
    main()
