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
    ap.add_argument("--disk-restart", metavar="KIND:TOKENS", action="append",
                    help="instead: TTFT of a cached prompt after a server restart (--cache-dir), e.g. v4-hca:900000, "
                         "v4:131072 or mla:16384 (repeatable; disk_restart below)")
    ap.add_argument("--disk-overhead", action="store_true",
                    help="instead: step times with and without the disk tier writing (disk_overhead below)")
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
    main()
