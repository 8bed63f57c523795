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

from bench.common import cpu_name, cpu_time_rows, time_rows  # noqa: E402
from openr2.config import ModelConfig  # noqa: E402
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
    ap.add_argument("--disk-restart", metavar="KIND:TOKENS", action="append",
                    help="instead: TTFT of a cached prompt after a server restart (--cache-dir), e.g. v4-hca:900000, "
                         "v4:131072 or mla:16384 (repeatable; disk_restart below)")
    ap.add_argument("--disk-overhead", action="store_true",
                    help="instead: step times with and without the disk tier writing (disk_overhead below)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time each step by this process's CPU time instead of the wall clock (with one thread, "
                         "OMP_NUM_THREADS=1: the step's own compute, not the time other processes held the CPU)")
    args = ap.parse_args()
    if args.disk_overhead:
        disk_overhead(args.runs)
        return
    if args.disk_restart:
        disk_restart(args.disk_restart)
        return
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


# ------------------------------------------------------------------------------------------ DeepSeek-V4 (issue 18)
V4_DOC = """DeepSeek-V4 long context (--v4): decode step time at 4K..1M over the engine's paged V4 cache
(engine/v4_cache.py) against the same model size with V3 dense MLA, prefill tokens/s, cache bytes, and the bytes
each decode step reads from the cache (for the bench model, and projected to V4-Flash / V3 dimensions).

The model (`v4_config`) is V4-shaped but small: one CSA layer (4:1 entries, a 16 x 16 indexer keeping the top
128) and one HCA layer (128:1), window 128, 4 heads of 64, 4 hyper-connection streams, MoE (hash-routed then
scored), float32; the pool's blocks are 512 tokens (4 x the window: the window kept at each block end costs
127/512 keys per token), shuffled in the pool. The dense model (`v4_dense_config`) is DeepSeek-V3 of the same
hidden size, layers, heads and experts, MLA with latent 64 + rope 16 (the paged in-place kernel reads the whole
context per step).

Decode: one new token at each context S (a block boundary, so the step writes nothing and repeats), eager, as
engine/runner.py runs V4 (the row cache rebuilt from the pool at S, CSA's indexer scanning its entries in place,
its top-k entries gathered, HCA's entries gathered). Contexts up to --v4-prefill are decoded over the cache a real
chunked prefill filled; longer ones over a pool filled with unit-variance random values (the step's work does not
depend on them): the `fill` column says which. Each context's step is timed in interleaved rounds beside the
first context's step again, so `/first` compares the two within one window of a shared machine's load.
Dense decode always runs over random latents (a dense 1M prefill is ~N^2 / 2 attention: hours here).

Prefill: one prompt through the model over the paged cache in chunks of --v4-chunk (the engine's path: a row
cache per chunk, the running state carried), time to reach each context and tokens/s of the chunk ending there;
the dense model likewise up to --v4-dense-prefill, its MLA path chosen per chunk as the runner does.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/longctx.py --v4 [--contexts 4096,32768,131072,1048576
      --v4-prefill 131072 --runs 5]
"""


def v4_config():
    from openr2.presets import _YARN_V4, tiny_v4

    return dataclasses.replace(
        tiny_v4(), vocab_size=4096, hidden_size=128, moe_intermediate_size=128, n_routed_experts=8,
        num_hidden_layers=2, layer_types=["compressed_sparse_attention", "heavily_compressed_attention"],
        mlp_layer_types=["hash_moe", "moe"], compress_rates={"compressed_sparse_attention": 4,
                                                             "heavily_compressed_attention": 128},
        sliding_window=128, num_attention_heads=4, head_dim=64, qk_rope_head_dim=16, q_lora_rank=64, o_groups=2,
        o_lora_rank=32, hc_mult=4, index_n_heads=16, index_head_dim=16, index_topk=128,
        max_position_embeddings=1 << 21, rope_scaling=dict(_YARN_V4))


def v4_dense_config(cfg):
    from openr2.presets import tiny_v3

    return dataclasses.replace(
        tiny_v3(), vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, n_routed_experts=cfg.n_routed_experts, n_group=1,
        topk_group=1, first_k_dense_replace=0, kv_lora_rank=64, q_lora_rank=cfg.q_lora_rank, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=1 << 21, rope_scaling=None,
        num_nextn_predict_layers=0)


def v4_step_elements(cfg, S):
    """Cache elements one decode step at context S reads, all layers: the window's W - 1 keys; CSA: every indexer
    entry (the scan) and the index_topk selected entries; HCA: every entry."""
    total = 0
    for i in range(cfg.num_hidden_layers):
        m, Dh = cfg.compress_rate(i), cfg.head_dim
        total += (cfg.sliding_window - 1) * Dh
        if m and cfg.layer_types[i] == "compressed_sparse_attention":
            total += S // m * cfg.index_head_dim + min(cfg.index_topk, S // m) * Dh
        elif m:
            total += S // m * Dh
    return total


def dense_step_elements(cfg, S):
    return cfg.num_hidden_layers * S * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)


def v4_decode_step(model, pool, table, S):
    """One decode step of one row at position S (a block boundary: no state needed, nothing written)."""
    ids, positions, rows = torch.tensor([[7]]), torch.tensor([[S]]), table[: S // pool.block_size + 1]

    def run():
        with torch.inference_mode():
            return model(ids, positions, cache=pool.row_cache(rows, S, None), attn_impl="sparse")
    return run


def dense_decode_step(model, pool, table, S):
    ids, positions = torch.tensor([[7]]), torch.tensor([[S]])

    def run():
        with torch.inference_mode():
            return model(ids, positions, cache=pool.view([table], [S], [1]), attn_impl="absorbed")
    return run


def v4_prefill(model, pool, table, prompt, chunk, marks):
    """Chunked prefill of `prompt` over the V4 pool (the engine's path); -> {context: (s to reach it, tokens/s of
    the chunk ending there)} for each context in marks."""
    out, state, t0 = {}, None, time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(prompt), chunk):
            n, t1 = min(chunk, len(prompt) - s), time.perf_counter()
            cache = pool.row_cache(table, s, state)
            model(prompt[None, s : s + n], torch.arange(s, s + n)[None], cache=cache, attn_impl="sparse")
            state = cache.row_state()
            if s + n in marks:
                now = time.perf_counter()
                out[s + n] = (now - t0, n / (now - t1))
                print(f"# v4 prefill reached {s + n}: {now - t0:.1f} s, last chunk {n / (now - t1):.0f} tokens/s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return out


def dense_prefill(model, cfg, pool, table, prompt, chunk, marks):
    runner = SimpleNamespace(_attn_impl=partial(ModelRunner._attn_impl, SimpleNamespace(
        model=SimpleNamespace(config=cfg))))
    out, t0 = {}, time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(prompt), chunk):
            n, t1 = min(chunk, len(prompt) - s), time.perf_counter()
            model(prompt[None, s : s + n], torch.arange(s, s + n)[None], cache=pool.view([table], [s], [n]),
                  attn_impl=runner._attn_impl(n, s + n))
            if s + n in marks:
                now = time.perf_counter()
                out[s + n] = (now - t0, n / (now - t1))
    return out


def v4_main():
    from openr2.engine.v4_cache import V4Pool
    from openr2.presets import deepseek_v3, deepseek_v4_flash

    ap = argparse.ArgumentParser(description=V4_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--v4", action="store_true")
    ap.add_argument("--contexts", default="4096,32768,131072,1048576")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--v4-prefill", type=int, default=131072, help="real prefill up to this many tokens")
    ap.add_argument("--v4-dense-prefill", type=int, default=32768)
    ap.add_argument("--v4-chunk", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, and steps timed in this process's CPU time (what other processes' load "
                         "disturbs least) instead of wall time")
    args = ap.parse_args()
    if args.cpu_time:
        torch.set_num_threads(1)
    contexts = [int(c) for c in args.contexts.split(",")]
    bs, chunk = args.block_size, args.v4_chunk
    if any(S % bs or S % chunk for S in contexts):
        raise SystemExit(f"contexts must be multiples of the block size {bs} and the chunk {chunk}")
    torch.manual_seed(0)
    cfg = v4_config()
    dcfg = v4_dense_config(cfg)
    model, dense = build_model(cfg, seed=0).eval(), build_model(dcfg, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    flash, v3 = deepseek_v4_flash(), deepseek_v3()
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "block_size": bs, "decode": [], "prefill": {}, "cache_bytes": {}}
    # the real prefill: one prompt up to max(contexts within --v4-prefill)
    P = max([S for S in contexts if S <= args.v4_prefill], default=0)
    prompt = torch.randint(0, cfg.vocab_size, (max(P, args.v4_dense_prefill),), generator=gen)
    filled = V4Pool(cfg, P // bs + 1, bs) if P else None
    table = torch.randperm(P // bs + 1, generator=gen).tolist() if P else []
    if P:
        t0 = time.perf_counter()
        result["prefill"]["v4"] = v4_prefill(model, filled, table, prompt[:P], chunk, set(contexts))
        print(f"# v4 prefill of {P} tokens: {time.perf_counter() - t0:.1f} s")
    DP = args.v4_dense_prefill
    if DP:
        pool = KVPool(dcfg, -(-DP // BLOCK), BLOCK)
        result["prefill"]["dense"] = dense_prefill(dense, dcfg, pool, list(range(pool.num_blocks)), prompt[:DP],
                                                   chunk, set(contexts) | {DP})
        del pool
    for name, c in (("bench_v4", cfg), ("bench_dense", dcfg)):
        pool_cls = V4Pool if c.is_v4 else KVPool
        per_token = pool_cls.bytes_per_block(c, bs, torch.float32) / bs if c.is_v4 else bytes_per_token(c, torch.float32)
        result["cache_bytes"][name] = {"per_token": per_token, **{str(S): per_token * S for S in contexts}}
    print(f"{'context':>8} {'fill':>8} {'v4 ms':>7} {'/first':>7} {'v4 best':>8} {'/first':>6} {'dense ms':>9} "
          f"{'v4 MB':>7} {'dense MB':>9} "
          f"{'Flash MB':>9} {'V3 MB':>8} {'load':>5}   (MB read from the cache per step; Flash/V3: bf16 at "
          f"V4-Flash's / V3's dimensions)")
    first = None
    for S in contexts:
        if S <= P:
            pool, rows, fill = filled, table, "prefill"
        else:
            pool = V4Pool(cfg, S // bs + 1, bs)
            for t in (pool.window, *pool.entries.values(), *pool.index_entries.values(),
                      *(h for pair in pool.halves.values() for h in pair)):
                t.normal_(generator=gen)
            rows, fill = torch.randperm(pool.num_blocks, generator=gen).tolist(), "random"
        dpool = KVPool(dcfg, -(-(S + 1) // BLOCK), BLOCK)
        for t in (dpool.c_kv, dpool.k_rope):
            t.normal_(generator=gen)
        dtable = torch.randperm(dpool.num_blocks, generator=gen).tolist()
        steps = {"v4": v4_decode_step(model, pool, rows, S), "dense": dense_decode_step(dense, dpool, dtable, S)}
        if first is not None:
            steps["v4_first"] = first
        times, other = (cpu_time_rows if args.cpu_time else time_rows)(steps, args.runs, warmup=1)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        best = {k: 1e3 * min(v) for k, v in times.items()}  # on a shared machine: the least disturbed run
        load = os.getloadavg()[0]
        mb = {"v4": 4 * v4_step_elements(cfg, S) / 1e6, "dense": 4 * dense_step_elements(dcfg, S) / 1e6,
              "v4_flash_bf16": 2 * v4_step_elements(flash, S) / 1e6, "v3_bf16": 2 * dense_step_elements(v3, S) / 1e6}
        vs_first = ms["v4"] / ms.get("v4_first", ms["v4"])
        best_vs_first = best["v4"] / best.get("v4_first", best["v4"])
        print(f"{S:>8} {fill:>8} {ms['v4']:>7.2f} {vs_first:>7.2f} {best['v4']:>8.2f} {best_vs_first:>6.2f} "
              f"{ms['dense']:>9.2f} {mb['v4']:>7.2f} {mb['dense']:>9.1f} {mb['v4_flash_bf16']:>9.1f} "
              f"{mb['v3_bf16']:>8.0f} {load:>5.1f}", flush=True)
        result["decode"].append({"context": S, "fill": fill, "ms": ms, "best_ms": best,
                                 "v4_vs_first_same_window": vs_first, "best_v4_vs_first": best_vs_first,
                                 "mb_read": mb, "other_processes": other, "load_avg_1m": load})
        first = first or steps["v4"]  # keeps the first context's pool alive
        del dpool
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

# ------------------------------------------------------------------------------------------------------------
# The disk tier (--cache-dir, engine/disk_cache.py): a long prompt asked again after a server restart.
#
# A checkpoint (random perturbed weights, a byte-level BPE of vocab 4096 trained on generated lines, as
# bench/server.py makes) is served by `python -m openr2 serve --cache-dir DIR` (a subprocess, eager, chunks of
# 512 tokens). One prompt of TOKENS random token ids goes to /v1/completions (max_tokens 1, greedy, logprobs):
# its time is the cold TTFT (the whole prefill; for 900K tokens the "fill"). The server is stopped (SIGTERM: the
# lifespan waits for the disk tier's queue), started again on the same directory, and the same prompt is sent:
# its time is the TTFT after the restart (the blocks loaded from disk, the last partial block computed), and its
# usage must count the loaded tokens as cached (billed at the cache-hit price) and its token equal the cold one.
# A second request to that server is served from the memory tier. The restart is repeated 3 times (medians). The files were just written, so they are in the
# page cache (the same machine: a restart, not a reboot).


def v4_small(vocab_size: int) -> ModelConfig:
    """The smallest honest V4 shape for 1M tokens: one layer of each attention kind at the release's rates
    (sliding window 128, CSA 4:1 with a top-64 indexer of 4 x 32, HCA 128:1), head_dim 64 (rope 16), 2
    hyper-connection streams, hash-routed then scored MoE, YaRN to 1M positions as the release."""
    from openr2.presets import _YARN_V4, tiny_v4

    return dataclasses.replace(
        tiny_v4(), vocab_size=vocab_size, num_hidden_layers=3,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        sliding_window=128, head_dim=64, qk_rope_head_dim=16, index_n_heads=4, index_head_dim=32, index_topk=64,
        max_position_embeddings=1 << 20, rope_scaling=dict(_YARN_V4), bos_token_id=0, eos_token_id=1)


def v4_small_hca(vocab_size: int) -> ModelConfig:
    """v4_small without its CSA layer: sliding window + HCA 128:1 (V4-Pro opens with HCA layers). A CSA layer's
    indexer scores every compressed entry for every prompt token (N^2 / 8 scores for N tokens, ~4 h of the
    reference path for 900K tokens here), so the 900K fill is measured on this shape."""
    return dataclasses.replace(v4_small(vocab_size), num_hidden_layers=2,
                               layer_types=["sliding_attention", "heavily_compressed_attention"],
                               mlp_layer_types=["hash_moe", "moe"])


def mla_small(vocab_size: int, max_len: int) -> ModelConfig:
    """bench/server.py's demo-sized MoE + MLA (small_moe) with room for the prompt."""
    from openr2.presets import small_moe

    return dataclasses.replace(small_moe(), vocab_size=vocab_size, num_nextn_predict_layers=0,
                               max_position_embeddings=max(max_len, small_moe().max_position_embeddings),
                               bos_token_id=0, eos_token_id=1)


def _serve(cmd: list[str], env: dict, port: int, log: str):
    """`openr2 serve` started; (process, seconds until /health answers)."""
    import subprocess

    from bench.server import wait_healthy

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    wait_healthy(proc, port, log)
    return proc, time.perf_counter() - t0


def _ask(port: int, prompt: list[int]):
    """One completion of the prompt (1 token, greedy): (seconds, its token, usage)."""
    import httpx

    body = {"model": "bench", "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1}
    t0 = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=None)
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise SystemExit(f"FAIL: {r.status_code} {r.text[:500]}")
    out = r.json()
    return elapsed, out["choices"][0]["logprobs"]["tokens"], out["usage"]


def disk_restart(specs: list[str], restarts_n: int = 3) -> None:
    import tempfile

    from bench.common import cpu_name
    from bench.server import _lines, free_port, stop_server
    from openr2.checkpoints import save_model
    from openr2.engine.v4_cache import V4Pool
    from openr2.tokenizer import train_bpe
    from tests.hf_utils import perturb_

    results = []
    print(f"cpu: {cpu_name()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}")
    for spec in specs:
        kind, tokens = spec.split(":")
        tokens = int(tokens)
        with tempfile.TemporaryDirectory(prefix="openr2-disk-") as tmp:
            tokenizer = train_bpe(_lines(2000, 0), vocab_size=4096)
            V = tokenizer.vocab_size
            cfg = {"v4": v4_small, "v4-hca": v4_small_hca}[kind](V) if kind.startswith("v4") else \
                mla_small(V, tokens + 64)
            model = build_model(cfg, seed=0)
            perturb_(model, seed=1, scale=0.05)
            ckpt = os.path.join(tmp, "ckpt")
            save_model(model, ckpt)
            tokenizer.save_pretrained(ckpt)
            bs = 128 if cfg.is_v4 else 64
            per_block = V4Pool.bytes_per_block(cfg, bs, torch.float32) if cfg.is_v4 else \
                bs * bytes_per_token(cfg, torch.float32)
            num_blocks = -(-(tokens + 64) // bs) + 4
            gen = torch.Generator().manual_seed(5)
            prompt = torch.randint(4, V, (tokens,), generator=gen).tolist()
            cache_dir = os.path.join(tmp, "cache")
            port = free_port()
            flags = ["--cache-dir", cache_dir, "--cache-dir-bytes", "64GiB", "--num-blocks", str(num_blocks),
                     "--block-size", str(bs), "--max-num-batched-tokens", "512", "--no-compile",
                     "--max-model-len", str(tokens + 64)]
            env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")}

            log1, log2 = os.path.join(tmp, "serve1.log"), os.path.join(tmp, "serve2.log")
            serve = [sys.executable, "-m", "openr2", "serve", "--model", ckpt, "--port", str(port),
                     "--data-dir", os.path.join(tmp, "data"), "--served-model-name", "bench", *flags]
            proc, listen1 = _serve(serve, env, port, log1)
            cold_s, cold_tok, cold_usage = _ask(port, prompt)
            t0 = time.perf_counter()
            how = stop_server(proc)
            stop_s = time.perf_counter() - t0
            files = [os.path.join(d, f) for d, _, fs in os.walk(cache_dir) for f in fs]
            disk_bytes = sum(os.path.getsize(f) for f in files)
            restarts = []
            for _ in range(restarts_n):  # each a fresh process: its first request loads from disk
                proc, listen2 = _serve(serve, env, port, log2)
                try:
                    warm_s, warm_tok, warm_usage = _ask(port, prompt)
                    mem_s, mem_tok, mem_usage = _ask(port, prompt)
                finally:
                    stop_server(proc)
                restarts.append({"listen_s": listen2, "ttft_s": warm_s, "memory_ttft_s": mem_s,
                                 "same_token": cold_tok == warm_tok == mem_tok,
                                 "cached": warm_usage["prompt_tokens_details"]["cached_tokens"]})
            warm_s, mem_s = (statistics.median(r[k] for r in restarts) for k in ("ttft_s", "memory_ttft_s"))
            cached = min(r["cached"] for r in restarts)
            row = {"kind": kind, "tokens": tokens, "block_size": bs, "pool_bytes": num_blocks * per_block,
                   "params": sum(p.numel() for p in model.parameters()),
                   "cold_ttft_s": cold_s, "listen_s": listen1, "stop": how, "stop_s": stop_s,
                   "files": len(files), "disk_bytes": disk_bytes, "restarts": restarts,
                   "restart_ttft_s_median": warm_s, "memory_ttft_s_median": mem_s, "cached_tokens": cached,
                   "cold_usage": cold_usage, "restart_usage": warm_usage,
                   "same_token": all(r["same_token"] for r in restarts), "load_1m": os.getloadavg()[0]}
            results.append(row)
            ttfts = ", ".join(f"{r['ttft_s']:.2f}" for r in restarts)
            listens = ", ".join(f"{r['listen_s']:.1f}" for r in restarts)
            print(f"{kind} {tokens} tokens: cold (fill) {cold_s:.1f} s; after a restart (median of {restarts_n}) TTFT "
                  f"{warm_s:.2f} s ({ttfts}; {cached} cached, "
                  f"{len(files)} files, {disk_bytes / 2**20:.0f} MiB); memory-tier TTFT {mem_s:.2f} s; "
                  f"cold/restart {cold_s / warm_s:.1f}x; same token {row['same_token']}; listening after "
                  f"{listens} s; stop {how}; load {row['load_1m']:.1f}")
    print(json.dumps({"disk_restart": results}))


def disk_overhead(runs: int) -> None:
    """Do the disk tier's writes stall steps? The demo-sized MLA model (mla_small), eager, blocks of 16, in one
    process: a 4096-token prompt's prefill (chunks of 512: 32 blocks written per chunk), then 8 rows decoding 256
    tokens each (a block completes every 16 steps per row). Without and with --cache-dir (a fresh directory per
    run, so every block is written), runs interleaved; per run the prefill's seconds and the decode steps'
    median / p99 / max ms. The writes happen on the writer thread; the step pays the copy out of the pool."""
    import tempfile

    from bench.common import cpu_name
    from openr2.engine.engine import EngineConfig, LLMEngine
    from openr2.engine.sampling import SamplingParams

    cfg = mla_small(4096, 8192)
    model = build_model(cfg, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(4, 4096, (4096,), generator=gen).tolist()
    rows = [torch.randint(4, 4096, (64,), generator=gen).tolist() for _ in range(8)]
    print(f"cpu: {cpu_name()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}")
    out = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="openr2-disk-") as tmp:
        for r in range(runs):
            for mode in ("off", "on"):
                cache_dir = os.path.join(tmp, f"{r}") if mode == "on" else None
                engine = LLMEngine(model, config=EngineConfig(block_size=16, num_blocks=600, max_num_batched_tokens=512,
                                                              cache_dir=cache_dir))
                spill_s = [0.0]
                if cache_dir:  # the step's own share of the writes: copying the blocks out and queueing them
                    def timed(blocks, hashes, spill=engine.blocks.spill, acc=spill_s):
                        t0 = time.perf_counter()
                        spill(blocks, hashes)
                        acc[0] += time.perf_counter() - t0
                    engine.blocks.spill = timed
                t0 = time.perf_counter()
                engine.add_request("long", long_prompt, SamplingParams(max_tokens=1, temperature=0))
                while engine.has_unfinished_requests():
                    engine.step()
                prefill_s = time.perf_counter() - t0
                for i, p in enumerate(rows):
                    engine.add_request(f"r{i}", p, SamplingParams(max_tokens=256, temperature=0, ignore_eos=True))
                engine.step()  # the rows' prompts
                steps = []
                while engine.has_unfinished_requests():
                    t0 = time.perf_counter()
                    engine.step()
                    steps.append((time.perf_counter() - t0) * 1e3)
                steps.sort()
                row = {"prefill_s": prefill_s, "step_ms_median": statistics.median(steps),
                       "step_ms_p99": steps[int(0.99 * (len(steps) - 1))], "step_ms_max": steps[-1]}
                if cache_dir:
                    engine.flush_cache()
                    st = engine.blocks.disk.cache.stats
                    row |= {"written": st.written, "dropped": st.dropped, "writer_s": st.write_s,
                            "spill_s": spill_s[0], "spill_ms_per_block": spill_s[0] * 1e3 / max(1, st.written)}
                out[mode].append(row)
                print(mode, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    summary = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in out.items()}
    for k in ("prefill_s", "step_ms_median", "step_ms_p99", "step_ms_max"):
        print(f"{k:>15}: off {summary['off'][k]:8.2f}  on {summary['on'][k]:8.2f}  on/off "
              f"{summary['on'][k] / summary['off'][k]:.3f}")
    on = summary["on"]
    print(f"the steps' own cost of the writes: {on['spill_ms_per_block']:.3f} ms per block copied out and queued "
          f"({on['spill_s']:.3f} s in all over the prefill and the decode); the writer thread "
          f"{on['writer_s'] * 1e3 / on['written']:.3f} ms per block")
    print(json.dumps({"disk_overhead": out, "median": summary, "load_1m": os.getloadavg()[0]}))


if __name__ == "__main__":
    v4_main() if "--v4" in sys.argv[1:] else main()
