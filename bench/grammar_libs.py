"""Which grammar library for constrained decoding: xgrammar against llguidance on this CPU, same schema, same
vocabularies, same token stream.

For each library and vocabulary (the demo tokenizer, and a synthetic 128K-token byte vocabulary the size of
DeepSeek's, since no DeepSeek tokenizer is on this machine): the time to compile a JSON-schema grammar, the
time to build a matcher and its first mask (llguidance compiles lazily, so this is where its compile cost
shows), and the median time per token to compute the next-token mask and advance over a valid document
(the document's greedy tokenisation, the path a decode would take).

    python bench/grammar_libs.py [--runs 5]

llguidance is a dependency of openr2; xgrammar is not: `pip install --no-deps xgrammar apache-tvm-ffi` first
(its requirements pull in triton, which the CPU does not need; transformers is a dev dependency already).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "scores": {"type": "array", "items": {"type": "number"}},
    },
    "required": ["name", "age", "role", "tags", "address", "scores"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps({"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "engines", "notes"],
                       "address": {"city": "London", "zip": "W1"}, "scores": [9.5, 7, 10.25]},
                      separators=(",", ":"))  # compact: the separators both grammars are given


def demo_vocab() -> tuple[list[bytes], int]:
    """The demo tokenizer's tokens as bytes (byte-level BPE decoded) and its EOS id."""
    from openr2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(os.path.join(os.path.dirname(__file__), "..", "openr2", "assets", "openr2-demo"))
    return [tok.decode([i]).encode("utf-8", "surrogatepass") if i not in tok.special_token_ids else
            tok.id_to_token(i).encode() for i in range(tok.vocab_size)], tok.eos_token_id


def synthetic_vocab(size: int, seed: int = 0) -> tuple[list[bytes], int]:
    """`size` distinct tokens shaped like a code/text BPE vocabulary: every byte, then words with and without
    a leading space, digit runs, punctuation clusters and JSON-ish fragments. EOS is the last id."""
    rng = random.Random(seed)
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    letters, punct = "abcdefghijklmnopqrstuvwxyz", "{}[]():;,.\"'`-_=+*/\\<>!?#@&%|~^$"
    while len(tokens) < size - 1:
        kind = rng.random()
        if kind < 0.6:
            word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 10)))
            word = word.capitalize() if rng.random() < 0.2 else word
            text = (" " if rng.random() < 0.5 else "") + word
        elif kind < 0.7:
            text = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 3)))
        elif kind < 0.9:
            text = "".join(rng.choice(punct) for _ in range(rng.randint(2, 4)))
        else:
            text = rng.choice(['":', '",', '"}', ' "', '{"', '["', '"]', "\n  ", "\n    ", ": ", ", "]) + \
                "".join(rng.choice(letters) for _ in range(rng.randint(0, 5)))
        b = text.encode()
        if b not in seen:
            seen.add(b)
            tokens.append(b)
    tokens.append(b"<|eos|>")
    return tokens, size - 1


_INDEX: dict[int, tuple[dict[bytes, int], int]] = {}


def greedy_tokenize(vocab: list[bytes], text: bytes) -> list[int]:
    """Longest match first: a valid tokenisation of the document in any vocabulary that has every byte."""
    if id(vocab) not in _INDEX:  # llguidance calls this during matching: build the lookup once
        index: dict[bytes, int] = {}
        for i, t in enumerate(vocab[:-1]):
            index.setdefault(t, i)
        _INDEX[id(vocab)] = index, max(len(t) for t in index)
    index, longest = _INDEX[id(vocab)]
    out, i = [], 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 0, -1):
            tid = index.get(text[i:i + n])
            if tid is not None:
                out.append(tid)
                i += n
                break
    return out


def bench_xgrammar(vocab, eos, ids, runs):
    import xgrammar as xgr

    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[eos])
    compile_s, first_s, per_token = [], [], []
    for _ in range(runs):
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)  # a cold compile each run
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, strict_mode=True,
                                                 separators=(",", ":"))
        t1 = time.perf_counter()
        matcher = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, len(vocab))
        matcher.fill_next_token_bitmask(mask)
        t2 = time.perf_counter()
        compile_s.append(t1 - t0)
        first_s.append(t2 - t1)
        for t in ids:
            s = time.perf_counter()
            assert matcher.accept_token(t), "xgrammar rejected a token of a valid document"
            matcher.fill_next_token_bitmask(mask)
            per_token.append(time.perf_counter() - s)
        assert matcher.accept_token(eos)
    return compile_s, first_s, per_token


def bench_llguidance(vocab, eos, ids, runs):
    import llguidance
    import llguidance.torch

    class Wrapped:  # llguidance.TokenizerWrapper's protocol
        eos_token_id, bos_token_id, tokens, special_token_ids = eos, None, vocab, [eos]

        def __call__(self, s):
            return greedy_tokenize(vocab, s if isinstance(s, bytes) else s.encode())

    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    compile_s, first_s, per_token = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        err = llguidance.LLMatcher.validate_grammar(grammar, tok)
        assert not err, err
        t1 = time.perf_counter()
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        mask = llguidance.torch.allocate_token_bitmask(1, len(vocab))
        llguidance.torch.fill_next_token_bitmask(matcher, mask)
        t2 = time.perf_counter()
        compile_s.append(t1 - t0)
        first_s.append(t2 - t1)
        for t in ids:
            s = time.perf_counter()
            assert matcher.consume_token(t), matcher.get_error()
            llguidance.torch.fill_next_token_bitmask(matcher, mask)
            per_token.append(time.perf_counter() - s)
        assert matcher.consume_token(eos), matcher.get_error()
    return compile_s, first_s, per_token


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# torch {torch.__version__}, cpu {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, runs {args.runs}")
    rows = []
    for vocab_name, (vocab, eos) in (("demo (512)", demo_vocab()), ("synthetic 128K", synthetic_vocab(128 * 1024))):
        ids = greedy_tokenize(vocab, DOCUMENT.encode())
        for lib, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            compile_s, first_s, per_token = fn(vocab, eos, ids, args.runs)
            row = dict(vocab=vocab_name, lib=lib, tokens=len(ids), compile_ms=statistics.median(compile_s) * 1e3,
                       first_mask_ms=statistics.median(first_s) * 1e3,
                       mask_us_median=statistics.median(per_token) * 1e6,
                       mask_us_p90=sorted(per_token)[int(0.9 * len(per_token))] * 1e6)
            rows.append(row)
    print(f"{'vocab':<16} {'library':<11} {'compile ms':>10} {'matcher+1st mask ms':>20} "
          f"{'mask+advance us/token median':>29} {'p90':>8}")
    for r in rows:
        print(f"{r['vocab']:<16} {r['lib']:<11} {r['compile_ms']:>10.1f} {r['first_mask_ms']:>20.2f} "
              f"{r['mask_us_median']:>29.1f} {r['mask_us_p90']:>8.1f}")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
