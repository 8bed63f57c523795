"""Constrained decoding: what does a grammar cost per generated token, at batch 1 and batch 8?

The same engine config, prompts and number of new tokens, free against constrained (a JSON schema, the masks
computed per row by llguidance and applied in the batched sampler), side by side and interleaved (the
machine is shared). Greedy, eager decode, the demo model and its tokenizer (openr2/assets/openr2-demo:
512-token vocabulary, 5 layers, hidden 128: a small model, so the fixed per-token cost of the grammar shows
more than it would beside a larger one). The schema is an array of at least 200 small objects, so no row can
end before --new-tokens (every row of both sides decodes exactly that many tokens); free rows ignore EOS.
With --speculative mtp:2 both sides also carry MTP drafts (each constrained draft position gets its mask).

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/structured.py [--new-tokens 128 --runs 5 --batches 1 8]
Prints a table: wall ms per decode step and tokens/s of each side, the overhead in wall time and in this
process's CPU-seconds (steadier on a shared machine), and the CPU microseconds per token spent computing the
masks (GrammarState.masks) and advancing the matcher, and that grammar CPU per step as a share of a free
step's CPU (the steadiest figure here: the two sides decode different tokens, so even their model work
differs a little, MoE routing included); then a final JSON line.
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
from openr2.engine.grammar import GrammarState, StructuredOutputsParams  # noqa: E402
from openr2.engine.sampling import SamplingParams  # noqa: E402
from openr2.tokenizer import Tokenizer  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "openr2", "assets", "openr2-demo")
SCHEMA = {"type": "array", "minItems": 200, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "id": {"type": "integer"},
                                     "ok": {"type": "boolean"}},
    "required": ["name", "id", "ok"], "additionalProperties": False}}




grammar_s = {"masks": 0.0, "advance": 0.0, "tokens": 0}  # CPU time inside the grammar state, all runs


def _timed_grammar() -> None:
    """Count the time spent in GrammarState (mask computation, advancing) per committed token."""
    masks, advance = GrammarState.masks, GrammarState.advance

    def timed_masks(self, drafts):
        start = time.thread_time()  # CPU time: what the grammar costs, whatever else the machine runs
        try:
            return masks(self, drafts)
        finally:
            grammar_s["masks"] += time.thread_time() - start

    def timed_advance(self, token_id):
        start = time.thread_time()
        try:
            return advance(self, token_id)
        finally:
            grammar_s["advance"] += time.thread_time() - start
            grammar_s["tokens"] += 1

    GrammarState.masks, GrammarState.advance = timed_masks, timed_advance


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
          f"{f'synthetic {args.vocab}-token vocabulary' if args.vocab else 'demo model'}, eager, greedy, "
          f"{args.new_tokens} new tokens, runs {args.runs}, "
          f"speculative {args.speculative}")
    _timed_grammar()
    model, tok = large_vocab(args.vocab) if args.vocab else (load_model(DEMO), Tokenizer.from_pretrained(DEMO))
    config = EngineConfig(num_blocks=256, block_size=16, enable_prefix_caching=False,
                          speculative_config=args.speculative)
    free = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.new_tokens,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    engines = {"free": LLMEngine(model, tok, config), "constrained": LLMEngine(model, tok, config)}
    params = {"free": free, "constrained": constrained}
    results = []
    for batch in args.batches:
        prompts = [tok.encode(f"Record {i}: the list of users is") for i in range(batch)]
        outputs, cpu = {}, {name: [] for name in engines}

        def row(name, prompts=prompts, outputs=outputs, cpu=cpu):
            def go():
                start = time.process_time()
                _, ids = run_requests(engines[name], prompts, params[name])
                cpu[name].append(time.process_time() - start)
                outputs[name] = ids
            return go

        grammar_s.update(masks=0.0, advance=0.0, tokens=0)

        times, other = time_rows({name: row(name) for name in engines}, args.runs, warmup=1)
        assert all(len(ids) == args.new_tokens for ids in outputs["constrained"] + outputs["free"])
        text = tok.decode(outputs["constrained"][0])
        assert text.startswith("[{"), text  # the grammar held
        med = {name: statistics.median(t) for name, t in times.items()}
        med_cpu = {name: statistics.median(t[1:]) for name, t in cpu.items()}  # t[0]: the warm-up
        step_ms = {name: med[name] / args.new_tokens * 1e3 for name in med}
        r = dict(batch=batch, free_ms_per_step=step_ms["free"], constrained_ms_per_step=step_ms["constrained"],
                 free_tokens_per_s=batch * args.new_tokens / med["free"],
                 constrained_tokens_per_s=batch * args.new_tokens / med["constrained"],
                 free_cpu_ms_per_step=med_cpu["free"] / args.new_tokens * 1e3,
                 constrained_cpu_ms_per_step=med_cpu["constrained"] / args.new_tokens * 1e3,
                 overhead=med["constrained"] / med["free"] - 1, cpu_overhead=med_cpu["constrained"] / med_cpu["free"] - 1,
                 grammar_us_per_token=grammar_s["masks"] / max(grammar_s["tokens"], 1) * 1e6,
                 advance_us_per_token=grammar_s["advance"] / max(grammar_s["tokens"], 1) * 1e6, other_load=other)
        # the grammar's own CPU per step against a free step's: the overhead without the model's side of it
        # (the two sides' tokens differ, so their MoE routing, hence their model cost, differs too)
        r["grammar_share"] = (r["grammar_us_per_token"] + r["advance_us_per_token"]) * batch / 1e3 \
            / r["free_cpu_ms_per_step"]
        results.append(r)
    print(f"{'batch':>5} {'free ms/step':>13} {'constrained ms/step':>20} {'free tok/s':>11} "
          f"{'constrained tok/s':>18} {'overhead':>9} {'CPU ms/step free':>17} {'constrained':>12} "
          f"{'CPU overhead':>13} {'masks us/tok':>13} {'advance us/tok':>15} {'grammar share':>14}")
    for r in results:
        print(f"{r['batch']:>5} {r['free_ms_per_step']:>13.2f} {r['constrained_ms_per_step']:>20.2f} "
              f"{r['free_tokens_per_s']:>11.0f} {r['constrained_tokens_per_s']:>18.0f} {r['overhead']:>+9.1%} "
              f"{r['free_cpu_ms_per_step']:>17.2f} {r['constrained_cpu_ms_per_step']:>12.2f} "
              f"{r['cpu_overhead']:>+13.1%} {r['grammar_us_per_token']:>13.1f} {r['advance_us_per_token']:>15.1f} "
              f"{r['grammar_share']:>+14.1%}")
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
