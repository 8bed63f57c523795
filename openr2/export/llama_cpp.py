"""Run an exported GGUF in llama.cpp through llama-cpp-python (optional: `make bench-deps` installs it).

Owns the few calls the agreement tests and bench/gguf.py need, with token ids in and out so tokenization is
checked separately: greedy continuation, teacher-forced logits, tokenization. Import fails cleanly
(ImportError) when the package is absent; nothing else in openr2 imports this module.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np


def load(path: str, n_ctx: int = 1024, n_threads: int | None = None, logits_all: bool = True, f32_cache: bool = True):
    """A llama_cpp.Llama over the file, quiet, CPU; n_threads defaults to torch's thread count.

    f32_cache: keep llama.cpp's KV cache in F32 (its default is F16, which alone moves logits by ~1e-3), so
    an F32 export can be compared exactly; pass False to measure the default setup."""
    import llama_cpp
    import torch

    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        return llama_cpp.Llama(model_path=os.fspath(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
                               n_threads=n_threads or torch.get_num_threads(), n_batch=n_ctx, seed=0, **cache)


def logits(llm, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits [T, V] of one sequence (fresh context)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _last_logits(llm) -> np.ndarray:
    if llm._logits_all:
        return llm.scores[llm.n_tokens - 1]
    # without logits_all llama-cpp-python keeps no scores; the context holds the last token's row only
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def greedy(llm, ids: list[int], max_tokens: int, eos: int | None = None) -> list[int]:
    """Argmax continuation of `ids` (fresh context), stopping at eos (kept) or after max_tokens."""
    llm.reset()
    llm.eval(list(ids))
    out: list[int] = []
    for _ in range(max_tokens):
        token = int(np.argmax(_last_logits(llm)))
        out.append(token)
        if token == eos:
            break
        llm.eval([token])
    return out


def tokenize(llm, text: str) -> list[int]:
    """llama.cpp's tokenization (special tokens parsed, no BOS added): compare with Tokenizer.encode."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
