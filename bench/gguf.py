"""openr2 vs llama.cpp on the same model: decode tokens/s at batch 1, and does the exported GGUF agree with us?

The bundled demo model is exported with `openr2 export-gguf` to f32, q8_0 and q4_0 files and run in
llama.cpp through llama-cpp-python (`make bench-deps`). Both sides decode greedily from the same prompt
token ids (a chat-formatted question), EOS ignored, --gen-tokens tokens, one sequence; llama.cpp through a
plain eval/argmax loop, openr2 through LLM.generate (the serving path). Median of --runs after a warm-up;
rounds interleaved across rows.
Agreement (issue 8): on 10 held-out-style prompts openr2's greedy output (up to --agree-tokens) must equal
llama.cpp's for f32, and for q8_0 / q4_0 the share of positions where llama.cpp's top-1 token, teacher-forced
on openr2's output, equals openr2's (target for q8_0: >= 95%).

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/gguf.py [--model DIR --threads 2 --gen-tokens 128]
Prints a header, a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

# This file's name shadows the `gguf` package when Python puts bench/ first on the path: drop bench/.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.join(_HERE, ".."))  # run from a checkout

from openr2 import LLM, SamplingParams  # noqa: E402
from openr2.chat_format import encode_chat  # noqa: E402
from openr2.export.gguf import export_gguf  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "openr2", "assets", "openr2-demo")
QUESTIONS = ["What is 347+589?", "What is 12+30?", "What is 905-78?", "What is 64*7?", "What is 1000-1?",
             "What is 58+67?", "What is 123+456?", "What is 99*9?", "What is 250-125?", "What is 808+192?"]
TYPES = ("f32", "q8_0", "q4_0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEMO)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--agree-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="both sides (default: torch's thread count)")
    args = ap.parse_args()
    try:
        import llama_cpp

        from openr2.export import llama_cpp as lc
    except ImportError:
        sys.exit("llama-cpp-python is not installed: run `make bench-deps` (compiles llama.cpp, ~10 min once)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model_dir = os.path.abspath(args.model)
    print(f"# decode at batch 1: openr2 vs llama.cpp on {os.path.relpath(model_dir)}, CPU")
    print(f"# torch {torch.__version__}  llama-cpp-python {llama_cpp.__version__}  threads {threads} (both)  "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}  {args.gen_tokens} tokens x "
          f"{args.runs} runs (median)")

    llm = LLM(model_dir, compile=False)
    tok = llm.tokenizer
    prompts = [encode_chat([{"role": "user", "content": q}], tok) for q in QUESTIONS]
    ours = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=args.agree_tokens))]

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for t in TYPES:
            path = os.path.join(tmp, f"model-{t}.gguf")
            info = export_gguf(model_dir, path, t)
            runners[t] = lc.load(path, n_ctx=1024, n_threads=threads)
            fast = lc.load(path, n_ctx=1024, n_threads=threads, logits_all=False)
            agree = total = 0
            same = []
            for prompt, expected in zip(prompts, ours):
                theirs = lc.logits(runners[t], prompt + expected).argmax(-1)[len(prompt) - 1 : -1]
                agree += int((theirs == np.array(expected)).sum())
                total += len(expected)
                same.append(lc.greedy(fast, prompt, len(expected)) == expected)
            results[f"llama.cpp {t}"] = {"file_bytes": info["bytes"], "top1_agreement": agree / total,
                                         "greedy_equal_prompts": sum(same), "runner": fast}

        prompt = prompts[0]
        params = SamplingParams(temperature=0, max_tokens=args.gen_tokens, ignore_eos=True)
        compiled = LLM(model_dir, compile=True)  # the same model with the compiled decode step
        rows = {"openr2 fp32": lambda: llm.generate([{"prompt_token_ids": prompt}], params),
                "openr2 fp32 compiled": lambda: compiled.generate([{"prompt_token_ids": prompt}], params)}
        for t in TYPES:
            runner = results[f"llama.cpp {t}"]["runner"]
            rows[f"llama.cpp {t}"] = (lambda r: lambda: lc.greedy(r, prompt, args.gen_tokens))(runner)
        for fn in rows.values():
            fn()
        times: dict[str, list[float]] = {k: [] for k in rows}
        for _ in range(args.runs):
            for name, fn in rows.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    results["openr2 fp32"] = {"file_bytes": sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
                                                if f.endswith(".safetensors"))}
    results["openr2 fp32 compiled"] = dict(results["openr2 fp32"])
    base = args.gen_tokens / statistics.median(times["openr2 fp32"])
    print()
    print("| row | file MB | tokens/s | x openr2 | greedy = openr2 (10 prompts) | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    for name in rows:
        r = results[name]
        r.pop("runner", None)
        r["decode_tokens_per_s"] = args.gen_tokens / statistics.median(times[name])
        r["ratio"] = r["decode_tokens_per_s"] / base
        same = f"{r['greedy_equal_prompts']}/10" if "greedy_equal_prompts" in r else "-"
        agree = f"{100 * r['top1_agreement']:.1f}%" if "top1_agreement" in r else "-"
        print(f"| {name} | {r['file_bytes'] / 1e6:.2f} | {r['decode_tokens_per_s']:.0f} | {r['ratio']:.2f} | {same} | {agree} |")
    targets = {"f32 greedy equal on 10 prompts": results["llama.cpp f32"]["greedy_equal_prompts"] == 10,
               "q8_0 top-1 agreement >= 95%": results["llama.cpp q8_0"]["top1_agreement"] >= 0.95}
    for k, ok in targets.items():
        print(f"target {k}: {'met' if ok else 'NOT met'}")
    print(f"# load average at the end (1/5 min): {os.getloadavg()[0]:.2f} / {os.getloadavg()[1]:.2f} "
          f"on {os.cpu_count()} CPUs (this run included)")
    print(json.dumps({"bench": "gguf", "model": os.path.relpath(model_dir), "threads": threads,
                      "gen_tokens": args.gen_tokens, "rows": results, "targets": targets}))


if __name__ == "__main__":
    main()
