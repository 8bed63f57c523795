"""The GPU check (run by bench/gpu.sh whenever a GPU is lent): does the engine run, exactly and fast, on CUDA?

A V2-Lite-shaped model (DeepSeek-V2-Lite's widths: hidden 2048, 64 routed experts top-6, kv_lora_rank 512,
16 heads; --layers of them, default 8, plus one MTP module) with random weights, in bfloat16 on the GPU:
  (a) parity of the fast paths on the device: absorbed vs naive MLA, grouped vs looped experts, compiled vs
      eager decode step (float32 copies, max |diff| relative to the logits' scale), and greedy engine
      outputs of the compiled and eager engines;
  (b) decode tokens/s at batch 1 and batch 32, eager and compiled;
  (c) speculative decoding: MTP acceptance and speed-up at batch 1 (random weights: the acceptance says the
      machinery runs, not what a trained MTP module reaches) and n-gram, greedy outputs checked equal;
  (d) peak GPU memory.
--dry runs every section on the CPU with a tiny model and a few tokens (the test suite does, so the script
cannot rot); the numbers of a dry run mean nothing.

Run:  bash bench/gpu.sh            (on a GPU machine; prints a table per question and a final JSON line)
      bash bench/gpu.sh --dry      (anywhere)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from bench.common import run_requests  # noqa: E402
from openr2.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from openr2.engine.sampling import SamplingParams  # noqa: E402
from openr2.model.transformer import build_model  # noqa: E402
from openr2.presets import deepseek_v2_lite, tiny_v3  # noqa: E402


def config_for(args):
    if args.dry:
        return dataclasses.replace(tiny_v3(), num_nextn_predict_layers=1)
    return dataclasses.replace(deepseek_v2_lite(), num_hidden_layers=args.layers, num_nextn_predict_layers=1,
                               vocab_size=32000)


@torch.inference_mode()
def parity(model, device) -> dict:
    """Max |fast - plain| / max |plain| of the logits, in float32."""
    m = build_model(model.config, dtype=torch.float32, device=device, seed=1).eval()
    ids = torch.randint(0, m.config.vocab_size, (2, 24), device=device, generator=None)
    naive = m(ids, attn_impl="naive", moe_impl="looped")
    scale = naive.abs().max().item()
    out = {}
    for name, kw in (("absorbed", dict(attn_impl="absorbed", moe_impl="looped")),
                     ("grouped experts", dict(attn_impl="naive", moe_impl="grouped"))):
        out[name] = (m(ids, **kw) - naive).abs().max().item() / scale
    return out


def engine(model, tokenizer=None, **options) -> LLMEngine:
    e = LLMEngine(model, tokenizer, EngineConfig(kv_cache_bytes=options.pop("kv", 1 << 30), **options))
    e.warm_up()
    return e


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, tiny model, few tokens: the suite's check")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    device = "cpu" if args.dry else "cuda"
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device (use --dry to check the script on a CPU)")
    dtype = torch.float32 if args.dry else torch.bfloat16
    new_tokens = 4 if args.dry else args.new_tokens
    name = "cpu (dry run)" if args.dry else torch.cuda.get_device_name()
    config = config_for(args)
    print(f"# bench/gpu.py on {name}, torch {torch.__version__}, {config.num_hidden_layers} layers + MTP, {dtype}")
    result: dict = {"device": name, "dry": args.dry}
    t0 = time.perf_counter()
    model = build_model(config, dtype=dtype, device=device, seed=0).eval()
    if torch.cuda.is_available() and not args.dry:
        torch.cuda.reset_peak_memory_stats()

    result["a_parity"] = parity(model, device)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config.vocab_size, (64,), generator=gen).tolist() for _ in range(32)]
    compile_options = [False] if args.dry else [False, True]
    outputs, tok_s = {}, {}
    for compiled in compile_options:
        e = engine(model, compile=compiled)
        for batch in (1, 32):
            run_requests(e, prompts[:batch], params)  # warm-up
            seconds, ids = run_requests(e, prompts[:batch], params)
            tok_s[f"batch {batch}, {'compiled' if compiled else 'eager'}"] = batch * new_tokens / seconds
            outputs[(compiled, batch)] = ids
    if not args.dry:
        result["a_parity"]["compiled engine greedy equal"] = outputs[(True, 1)] == outputs[(False, 1)]
    result["b_decode_tok_s"] = tok_s

    spec = {}
    base = engine(model, compile=not args.dry)
    base_s, base_ids = run_requests(base, prompts[:1], params)
    for method in ("mtp:2", "ngram:3"):
        e = engine(model, compile=not args.dry, speculative_config=method)
        run_requests(e, prompts[:1], params)
        seconds, ids = run_requests(e, prompts[:1], params)
        spec[method] = {"speedup": base_s / seconds, "acceptance": e.spec_stats.acceptance_rate,
                        "greedy equal": ids == base_ids}
    result["c_speculative"] = spec
    if torch.cuda.is_available() and not args.dry:
        result["d_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["wall_s"] = time.perf_counter() - t0

    for key in ("a_parity", "b_decode_tok_s", "c_speculative"):
        print(f"\n({key[0]}) {key[2:]}")
        for k, v in result[key].items():
            print(f"  {k:<32} {v}")
    print(json.dumps(result))
    ok = all(v["greedy equal"] for v in spec.values()) and result["a_parity"].get("compiled engine greedy equal", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
