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
         and scored by model/indexer.py's separate products (the reference, and what DSA decode ran before).
Bytes read from the cache per step are counted from the shapes (per layer: dense S (C + R), DSA S Di + min(K, S)
(C + R) elements, 4 bytes each; dsa_gather also writes and re-reads a copy of the S Di indexer keys and its
[Hi, S] products, not counted). Prefill time: one prompt of
--prefill-tokens (4K: longer prompts take many minutes on a small CPU) through the model over the paged cache in
chunks of 512, each chunk through the MLA path the engine's runner picks (its cost model: DSA's absorbed path
attends over index_topk keys per query), dense and DSA.
Cache bytes per token: dense MLA (deepseek_v3) vs V3.2 (latent + indexer key), float32 and bfloat16.

Each later context also times the first context's DSA step again in the same interleaved rounds, so that
"DSA here / DSA at the first context" comes from one window of a shared machine's load.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/longctx.py [--contexts 4096,16384,65536,131072 --runs 5]
      (--prefill-tokens 0 skips the prefill)
Prints a table (ms per step, median) and a final JSON line.
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--prefill-tokens", type=int, default=4096)
    ap.add_argument("--compiled", action="store_true", help="also time DSA through the compiled decode step")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = config(args.heads)
    model = build_model(cfg, seed=0).eval()
    K, L = cfg.index_topk, cfg.num_hidden_layers
    C, R, Di = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim
    gen = torch.Generator().manual_seed(0)
    result = {"config": {"layers": L, "heads": cfg.num_attention_heads, "kv_lora_rank": C, "rope": R,
                         "index_heads": cfg.index_n_heads, "index_head_dim": Di, "index_topk": K},
              "threads": torch.get_num_threads(), "decode": [], "prefill": {}, "cache_bytes_per_token": {}}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        result["cache_bytes_per_token"][name] = {
            "dense_mla": bytes_per_token(dataclasses.replace(cfg, model_type="deepseek_v3"), dtype),
            "dsa": bytes_per_token(cfg, dtype)}
    print("cache bytes per token (all layers):", result["cache_bytes_per_token"])
    print(f"{'context':>8} {'dense ms':>9} {'dsa ms':>8} {'dsa_gather ms':>14} {'dense MB read':>14} "
          f"{'dsa MB read':>12} {'dsa/first':>10} {'load 1m':>8}")
    # the first context's DSA step, timed again beside each later context's rows: the ratio of the two comes
    # from one interleaved window, not from two windows of a shared machine's changing load
    first = None
    for S in (int(s) for s in args.contexts.split(",")):
        blocks = -(-(S + 1) // BLOCK)
        pool = KVPool(cfg, blocks, BLOCK)
        for t in (pool.c_kv, pool.k_rope, pool.k_index):
            t.normal_(generator=gen)
        table = [torch.randperm(blocks, generator=gen).tolist()]

        rows = {"dense": decode_step(model, 1 << 30, pool, table, S), "dsa": decode_step(model, K, pool, table, S),
                "dsa_gather": decode_step(model, K, pool, table, S, read="gather")}
        if args.compiled:
            rows["dsa_compiled"] = compiled_decode_step(model, K, pool, table, S)
            print(f"# {S}: compiled vs eager DSA logits, max diff "
                  f"{(rows['dsa_compiled']() - rows['dsa']()).abs().max().item():.2g}")
        if first is not None:
            rows["dsa_first"] = first
        # the two DSA reads are one function: the same logits (the fast one within float32 rounding)
        diff = (rows["dsa"]() - rows["dsa_gather"]()).abs().max().item()
        times, other = time_rows(rows, args.runs, warmup=1)
        load = os.getloadavg()[0]
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        mb = {"dense": L * S * (C + R) * 4 / 1e6, "dsa": L * (S * Di + min(K, S) * (C + R)) * 4 / 1e6}
        vs_first = ms["dsa"] / ms.get("dsa_first", ms["dsa"])
        if args.compiled:
            print(f"# {S}: dsa compiled {ms['dsa_compiled']:.2f} ms (eager {ms['dsa']:.2f})")
        print(f"{S:>8} {ms['dense']:>9.2f} {ms['dsa']:>8.2f} {ms['dsa_gather']:>14.2f} {mb['dense']:>14.1f} "
              f"{mb['dsa']:>12.1f} {vs_first:>10.2f} {load:>8.2f}   (dsa vs dsa_gather logits: max diff {diff:.2g})")
        result["decode"].append({"context": S, "ms": ms, "mb_read": mb, "other_processes": other,
                                 "load_avg_1m": load, "dsa_vs_gather_max_logit_diff": diff,
                                 "dsa_vs_first_same_window": vs_first})
        first = first or rows["dsa"]  # keeps the first context's pool alive
        del pool
    # prefill: one prompt in chunks of 512 through the naive path over the paged cache
    P = args.prefill_tokens
    if not P:
        print(json.dumps(result))
        return
    prompt = torch.randint(0, cfg.vocab_size, (P,), generator=gen)
    for mode, topk in (("dense", 1 << 30), ("dsa", K)):
        set_topk(model, topk)
        pool = KVPool(cfg, -(-P // BLOCK), BLOCK)
        table = [list(range(pool.num_blocks))]
        # the runner's per-chunk choice of MLA path, as the engine makes it for a dense (V3) or a V3.2 model
        mconf = cfg if mode == "dsa" else dataclasses.replace(cfg, model_type="deepseek_v3")
        runner = SimpleNamespace(_attn_impl=partial(ModelRunner._attn_impl, SimpleNamespace(
            model=SimpleNamespace(config=mconf))))
        t0, impls = time.perf_counter(), []
        with torch.inference_mode():
            for s in range(0, P, 512):
                n = min(512, P - s)
                impls.append(runner._attn_impl(n, s + n))
                model(prompt[None, s : s + n], torch.arange(s, s + n)[None], cache=pool.view(table, [s], [n]),
                      attn_impl=impls[-1])
        result["prefill"][mode] = {"tokens": P, "s": time.perf_counter() - t0, "chunks": impls}
        print(f"prefill {P} tokens ({mode}): {result['prefill'][mode]['s']:.2f} s, chunks {impls}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
