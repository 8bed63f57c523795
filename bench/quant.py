"""Weight-only quantization on the bundled demo model: what do int8 and int4 cost in quality, and save in bytes?

Rows: fp32 (the checkpoint as trained), int8 per channel, int4 g64 (asymmetric, the default), int4 g64
symmetric. Each quantized row is made the way a user makes it (`openr2 quantize` into a temporary
directory, then load_model), so the whole path is measured. Per row:
  weight bytes   all parameters and buffers in memory (embeddings, norms, router stay float32) and the
                 quantized linear layers alone, each as a ratio of fp32
  perplexity     exp(mean token cross-entropy) of the reference completions (reasoning + answer) of fresh
                 held-out problems (tasks/synthetic.py test split), one sequence at a time
  accuracy       greedy task accuracy on fresh held-out problems through the engine (train/evaluate.py)
  tokens/s       batch-1 greedy decode through LLM.generate (prompt + --gen-tokens, EOS ignored), median of
                 --runs after a warm-up
Targets (issue 8): int8 perplexity <= +0.5%, int4 g64 <= +5%, int4 weight bytes <= 0.16x of fp32.
Then a kernel table for one linear layer (the demo's 384x128 and a 2048x2048): fp32 / bf16 dense against
the quantized fast paths and aten's int8 kernel, which the int8 fast path does not use (slower here).

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/quant.py [--model DIR --problems 100 --threads 2]
Prints a header, a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from openr2 import LLM, SamplingParams, load_model  # noqa: E402
from openr2.chat_format import encode_chat  # noqa: E402
from openr2.checkpoints import quantize_checkpoint  # noqa: E402
from openr2.quant.layers import QuantExperts, QuantLinear, weight_bytes  # noqa: E402
from openr2.tasks.synthetic import held_out_problems  # noqa: E402
from openr2.tokenizer import Tokenizer  # noqa: E402
from openr2.train.data import sft_example  # noqa: E402
from openr2.train.evaluate import task_accuracy  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "openr2", "assets", "openr2-demo")
TASKS = [("addition", 3), ("subtraction", 3), ("multiplication", 2), ("modular", 2), ("countdown", 3)]
ROWS = {"fp32": None, "int8": ("int8", None, False), "int4 g64": ("int4", 64, False),
        "int4 g64 sym": ("int4", 64, True)}


def linear_bytes(model) -> int:
    """Bytes of the layers quantization replaces (nn.Linear and routed experts, or their quantized swaps)."""
    from openr2.model.moe import RoutedExperts

    return sum(weight_bytes(m) for m in model.modules()
               if isinstance(m, (torch.nn.Linear, RoutedExperts, QuantLinear, QuantExperts)))


@torch.no_grad()
def perplexity(model, examples: list[tuple[list[int], list[int]]]) -> float:
    nll = tokens = 0.0
    for ids, mask in examples:
        x = torch.tensor([ids])
        logp = model(x)[0, :-1].float().log_softmax(-1)
        target = torch.tensor(ids[1:])
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        nll -= logp[keep].gather(1, target[keep, None]).sum().item()
        tokens += int(keep.sum())
    return math.exp(nll / tokens)


def decode_tokens_per_s(llm: LLM, prompt: list[int], gen_tokens: int, runs: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=gen_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt}], params)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], params)
        times.append(time.perf_counter() - t0)
        assert len(out[0].outputs[0].token_ids) == gen_tokens
    return gen_tokens / statistics.median(times)


def _int8pack(qweight, scale, x):
    return torch._weight_int8pack_mm(x, qweight, scale)


def kernel_table(runs: int = 50) -> list[dict]:
    """Why the fast paths are what they are: one linear layer, microseconds per call, median of 5 x runs."""
    from openr2.quant.layers import QuantSpec

    rows = []
    for out_f, in_f in ((384, 128), (2048, 2048)):
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        q8 = QuantLinear(in_f, out_f, QuantSpec("int8"))
        q8.q.set_from(lin.weight.detach(), QuantSpec("int8"))
        q4 = QuantLinear(in_f, out_f, QuantSpec("int4", 64))
        q4.q.set_from(lin.weight.detach(), QuantSpec("int4", 64))
        w16 = lin.weight.detach().bfloat16()
        for m in (1, 16):
            x = torch.randn(m, in_f)
            x16 = x.bfloat16()
            int8pack = functools.partial(_int8pack, q8.q.qweight, q8.q.scale)
            cases = [("fp32 dense", lin, x), ("int8 dequant-per-use (fast path)", q8, x),
                     ("int8 aten _weight_int8pack_mm", int8pack, x),
                     ("int4 g64 dequant-per-use, fp32 (fast path)", q4, x),
                     ("bf16 dense", functools.partial(torch.nn.functional.linear, weight=w16), x16),
                     ("int4 g64 aten int4pack, bf16 (fast path)", q4, x16)]
            for name, fn, arg in cases:
                with torch.inference_mode():
                    fn(arg)
                    samples = []
                    for _ in range(5):
                        t0 = time.perf_counter()
                        for _ in range(runs):
                            fn(arg)
                        samples.append((time.perf_counter() - t0) / runs)
                rows.append({"shape": f"{out_f}x{in_f}", "M": m, "path": name, "us": 1e6 * statistics.median(samples)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEMO, help="float checkpoint directory (default: the bundled demo model)")
    ap.add_argument("--problems", type=int, default=100, help="held-out problems per task, for each metric")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1234, help="held-out problem draw (fresh: not the training eval's)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model_dir = os.path.abspath(args.model)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        sys.exit(f"{model_dir}: no checkpoint (train the demo model first: openr2 train --preset demo)")
    print(f"# weight-only quantization on {os.path.relpath(model_dir)}: fp32 vs int8 vs int4 g64, CPU float32")
    print(f"# torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}  problems/task {args.problems}  "
          f"tasks {','.join(f'{t}:{d}' for t, d in TASKS)}  decode {args.gen_tokens} tokens x {args.runs} runs (median)")

    tok = Tokenizer.from_pretrained(model_dir)
    examples = [sft_example(p, tok) for task, d in TASKS for p in held_out_problems(task, d, args.problems, args.seed)]
    prompt = encode_chat([{"role": "user", "content": "What is 347+589?"}], tok)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in ROWS.items():
            path = model_dir
            if recipe is not None:
                path = os.path.join(tmp, name.replace(" ", "-"))
                quantize_checkpoint(model_dir, path, *recipe)
            model = load_model(path)
            llm = LLM(model, tok, compile=False)
            row = {"weight_bytes": weight_bytes(model), "linear_bytes": linear_bytes(model),
                   "file_bytes": sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                                     if f.endswith(".safetensors")),
                   "perplexity": perplexity(model, examples)}
            t0 = time.perf_counter()
            acc = {}
            for task, d in TASKS:
                r = task_accuracy(model, tok, task, d, args.problems, seed=args.seed, llm=llm)
                acc[f"{task}:{d}"] = r.accuracy
            row["accuracy"] = acc
            row["accuracy_mean"] = statistics.mean(acc.values())
            row["accuracy_s"] = time.perf_counter() - t0
            row["decode_tokens_per_s"] = decode_tokens_per_s(llm, prompt, args.gen_tokens, args.runs)
            results[name] = row
            print(f"#   {name}: done", flush=True)

    base = results["fp32"]
    print()
    head = ["row", "weight MB", "x fp32", "linear x fp32", "perplexity", "d ppl", "accuracy", "tokens/s", "x fp32"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in results.items():
        r["bytes_ratio"] = r["weight_bytes"] / base["weight_bytes"]
        r["linear_bytes_ratio"] = r["linear_bytes"] / base["linear_bytes"]
        r["ppl_delta"] = r["perplexity"] / base["perplexity"] - 1
        r["speed_ratio"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        print(f"| {name} | {r['weight_bytes'] / 1e6:.3f} | {r['bytes_ratio']:.4f} | {r['linear_bytes_ratio']:.4f} | "
              f"{r['perplexity']:.4f} | {100 * r['ppl_delta']:+.2f}% | {100 * r['accuracy_mean']:.1f}% | "
              f"{r['decode_tokens_per_s']:.0f} | {r['speed_ratio']:.2f} |")
    print()
    print("accuracy per task: " + "; ".join(f"{n}: " + ", ".join(f"{t} {100 * a:.0f}%" for t, a in r["accuracy"].items())
                                           for n, r in results.items()))
    targets = {"int8 ppl <= +0.5%": results["int8"]["ppl_delta"] <= 0.005,
               "int4 g64 ppl <= +5%": results["int4 g64"]["ppl_delta"] <= 0.05,
               "int4 g64 weight bytes <= 0.16x": results["int4 g64"]["bytes_ratio"] <= 0.16,
               "int4 g64 sym weight bytes <= 0.16x": results["int4 g64 sym"]["bytes_ratio"] <= 0.16}
    for k, ok in targets.items():
        print(f"target {k}: {'met' if ok else 'NOT met'}")
    kernels = kernel_table()
    print()
    print("| layer [out x in] | M | path | us per call |")
    print("|---|---|---|---|")
    for k in kernels:
        print(f"| {k['shape']} | {k['M']} | {k['path']} | {k['us']:.1f} |")
    print(f"# load average at the end (1/5 min): {os.getloadavg()[0]:.2f} / {os.getloadavg()[1]:.2f} "
          f"on {os.cpu_count()} CPUs (this run included)")
    print(json.dumps({"bench": "quant", "model": os.path.relpath(model_dir), "threads": torch.get_num_threads(),
                      "problems_per_task": args.problems, "rows": results, "targets": targets, "kernels": kernels}))


if __name__ == "__main__":
    main()
