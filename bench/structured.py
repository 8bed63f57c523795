"""Constrained decoding: what does a grammar cost per generated token, at batch 1 and batch 8?

The same engine config, prompts and number of new tokens, free against constrained (a JSON schema, the masks
computed per row by llguidance and applied in the batched sampler), side by side and interleaved (the
machine is shared). Three constrained sides: the engine's path (the next mask computed ahead on a background
thread while the model runs, packed masks applied by one C pass, engine/token_mask.py), the same without the
computing ahead ("no-prefetch"), and the reference path (masks computed in the step, unpacked to bool and
applied with masked_fill), so each gain shows in one run.
Greedy, eager decode, the demo model and its tokenizer (openr2/assets/openr2-demo: 512-token vocabulary, 5
layers, hidden 128: a small model, so the fixed per-token cost of the grammar shows more than it would beside a
larger one), or with --vocab a synthetic vocabulary (131072: DeepSeek's size) and a random model over it. The
schema is an array of at least 200 small objects, so no row can end before --new-tokens (every row of every
side decodes exactly that many tokens); free rows ignore EOS. With --speculative mtp:2 all sides carry MTP
drafts (each constrained draft position gets its mask).

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/structured.py [--new-tokens 128 --runs 5 --batches 1 8]
Prints a table per side: wall ms per decode step and tokens/s, the overhead against free decoding in wall time
(median of the runs, and of the per-round ratios: each round runs every side back to back) and in this
process's CPU-seconds, and per token the CPU microseconds computing masks (in whichever thread), the wall
microseconds the step waited for a mask, applying them, and advancing the matcher; then a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from bench.common import cpu_name, run_requests, time_rows  # noqa: E402
from openr2.checkpoints import load_model  # noqa: E402
from openr2.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from openr2.engine.grammar import GrammarCompiler, GrammarState, StructuredOutputsParams  # noqa: E402
from openr2.engine.sampling import SamplingParams  # noqa: E402
from openr2.engine.token_mask import TokenMask  # noqa: E402
from openr2.tokenizer import Tokenizer  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "openr2", "assets", "openr2-demo")
SCHEMA = {"type": "array", "minItems": 200, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "id": {"type": "integer"},
                                     "ok": {"type": "boolean"}},
    "required": ["name", "id", "ok"], "additionalProperties": False}}




grammar_s = {"compute": 0.0, "wait": 0.0, "apply": 0.0, "advance": 0.0, "tokens": 0}  # per side, reset


def _timed(cls, name: str, key: str, clock=time.thread_time, count: bool = False) -> None:
    """Add the time spent in cls.name (thread CPU time: what it costs, whatever else the machine runs; or
    wall time for waits) to grammar_s[key]."""
    fn = getattr(cls, name)

    def timed(*args, **kwargs):
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            grammar_s[key] += clock() - start
            grammar_s["tokens"] += count

    setattr(cls, name, timed)


def _timed_grammar() -> None:
    _timed(GrammarState, "_compute_row", "compute")  # on the step's thread or the prefetch thread
    _timed(GrammarState, "_settle", "wait", clock=time.perf_counter)
    _timed(GrammarState, "advance", "advance", count=True)
    _timed(TokenMask, "apply_", "apply")


def _byte_level(b: bytes) -> str:
    """GPT-2's byte-level alphabet (what tokenizers' ByteLevel writes in a vocabulary)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte], extra = chr(256 + extra), extra + 1
    return "".join(table[x] for x in b)


def large_vocab(size: int):
    """(model, tokenizer) with a `size`-token vocabulary: bench/grammar_libs.py's synthetic byte vocabulary (DeepSeek
    has no tokenizer on this machine) as a byte-level BPE without merges (prompts encode byte by byte; the masks
    see every token), EOS the last id, and the demo's architecture with random weights over that vocabulary."""
    import dataclasses

    import tokenizers

    from bench.grammar_libs import synthetic_vocab
    from openr2.config import ModelConfig
    from openr2.model.transformer import build_model
    from openr2.tokenizer import EOS

    vocab, _ = synthetic_vocab(size)
    bpe = tokenizers.models.BPE({_byte_level(t): i for i, t in enumerate(vocab[:-1])}, [])
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    config = dataclasses.replace(ModelConfig.from_pretrained(DEMO), vocab_size=size, eos_token_id=size - 1)
    return build_model(config, seed=0).eval(), Tokenizer(tok, bos_token=None, eos_token=EOS)


def apply_bench(tok, vocab_size: int, repeats: int = 20) -> dict:
    """Applying masks alone, both ways, on the masks of one answer under SCHEMA (llguidance's, at this vocabulary):
    the C pass over the packed words against the reference (unpackbits + masked_fill), each mask timed
    `repeats` times, best of (the machine is shared: the best is the cost without interference)."""
    compiler = GrammarCompiler(tok, vocab_size, prefetch=False)
    state = compiler.state(compiler.compile(StructuredOutputsParams(json=SCHEMA)), [])
    records = [{"name": "alice smith"[: 1 + i % 11], "id": 1234 * i, "ok": i % 2 == 0} for i in range(200)]
    ids = tok.encode(json.dumps(records, separators=(",", ":")))[:200]
    logits = torch.randn(1, vocab_size)
    best = {"kernel": [], "reference": []}
    for t in ids:
        mask = state.masks([])
        for name, use_kernel in (("kernel", True), ("reference", False)):
            m = TokenMask(mask.bits.copy(), mask.first, mask.n_tok, use_kernel)
            times = []
            for _ in range(repeats):
                x = logits.clone()
                start = time.perf_counter()
                m.apply_(x)
                times.append(time.perf_counter() - start)
            best[name].append(min(times))
        state.advance(t)
    return {name: {"median_us": statistics.median(v) * 1e6, "max_us": max(v) * 1e6} for name, v in best.items()}


SIDES = ("free", "constrained", "no-prefetch", "reference")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--speculative", default=None, help="e.g. mtp:2 (both sides)")
    ap.add_argument("--vocab", type=int, default=0, help="a synthetic vocabulary of this size (e.g. 131072) and a "
                    "random model over it, instead of the demo model and tokenizer")
    args = ap.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, cpu {cpu_name()} x {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}, "
          f"{f'synthetic {args.vocab}-token vocabulary' if args.vocab else 'demo model'}, eager, greedy, "
          f"{args.new_tokens} new tokens, runs {args.runs}, speculative {args.speculative}")
    model, tok = large_vocab(args.vocab) if args.vocab else (load_model(DEMO), Tokenizer.from_pretrained(DEMO))
    config = EngineConfig(num_blocks=256, block_size=16, enable_prefix_caching=False,
                          speculative_config=args.speculative)
    free = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.new_tokens,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    applied = apply_bench(tok, model.config.vocab_size)
    print(f"# applying one mask, best of 20, over the first 200 positions of one answer: C pass "
          f"median {applied['kernel']['median_us']:.1f} us (max {applied['kernel']['max_us']:.1f}), reference "
          f"median {applied['reference']['median_us']:.1f} us (max {applied['reference']['max_us']:.1f})")
    _timed_grammar()
    engines = {name: LLMEngine(model, tok, config) for name in SIDES}
    engines["no-prefetch"].grammars = GrammarCompiler(tok, model.config.vocab_size, prefetch=False)
    engines["reference"].grammars = GrammarCompiler(tok, model.config.vocab_size, prefetch=False, use_kernel=False)
    params = {"free": free, **dict.fromkeys(SIDES[1:], constrained)}
    results = []
    for batch in args.batches:
        prompts = [tok.encode(f"Record {i}: the list of users is") for i in range(batch)]
        outputs, cpu = {}, {name: [] for name in engines}
        spent = {name: dict.fromkeys(grammar_s, 0.0) for name in engines}

        def row(name, prompts=prompts, outputs=outputs, cpu=cpu, spent=spent):
            def go():
                grammar_s.update(dict.fromkeys(grammar_s, 0.0))
                start = time.process_time()
                _, ids = run_requests(engines[name], prompts, params[name])
                cpu[name].append(time.process_time() - start)
                outputs[name] = ids
                for k, v in grammar_s.items():
                    spent[name][k] += v
            return go

        times, other = time_rows({name: row(name) for name in engines}, args.runs, warmup=1)
        assert all(len(ids) == args.new_tokens for side in SIDES for ids in outputs[side])
        assert all(outputs[side] == outputs["reference"] for side in SIDES[1:])  # the fast paths change nothing
        text = tok.decode(outputs["constrained"][0])
        assert text.startswith("[{"), text  # the grammar held
        med = {name: statistics.median(t) for name, t in times.items()}
        med_cpu = {name: statistics.median(t[1:]) for name, t in cpu.items()}  # t[0]: the warm-up
        for name in SIDES[1:]:
            g = spent[name]
            tokens = max(g["tokens"], 1)
            r = dict(batch=batch, side=name, free_ms_per_step=med["free"] / args.new_tokens * 1e3,
                     ms_per_step=med[name] / args.new_tokens * 1e3,
                     free_tokens_per_s=batch * args.new_tokens / med["free"],
                     tokens_per_s=batch * args.new_tokens / med[name],
                     overhead=med[name] / med["free"] - 1,
                     overhead_paired=statistics.median(a / b for a, b in zip(times[name], times["free"])) - 1,
                     cpu_overhead=med_cpu[name] / med_cpu["free"] - 1,
                     compute_us_per_token=g["compute"] / tokens * 1e6, wait_us_per_token=g["wait"] / tokens * 1e6,
                     apply_us_per_token=g["apply"] / tokens * 1e6, advance_us_per_token=g["advance"] / tokens * 1e6,
                     other_load=other)
            results.append(r)
    print(f"{'batch':>5} {'side':>11} {'free ms/step':>13} {'ms/step':>8} {'free tok/s':>11} {'tok/s':>6} "
          f"{'overhead':>9} {'paired':>7} {'CPU overhead':>13} {'mask CPU us/tok':>16} {'wait us/tok':>12} "
          f"{'apply us/tok':>13} {'advance us/tok':>15}")
    for r in results:
        print(f"{r['batch']:>5} {r['side']:>11} {r['free_ms_per_step']:>13.2f} {r['ms_per_step']:>8.2f} "
              f"{r['free_tokens_per_s']:>11.0f} {r['tokens_per_s']:>6.0f} {r['overhead']:>+9.1%} "
              f"{r['overhead_paired']:>+7.1%} {r['cpu_overhead']:>+13.1%} {r['compute_us_per_token']:>16.1f} "
              f"{r['wait_us_per_token']:>12.1f} {r['apply_us_per_token']:>13.1f} {r['advance_us_per_token']:>15.1f}")
    print(json.dumps({"results": results, "apply": applied}))


if __name__ == "__main__":
    main()
