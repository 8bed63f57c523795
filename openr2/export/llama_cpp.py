"""Run an exported GGUF in llama.cpp through llama-cpp-python (optional: `make bench-deps` installs it).

Owns the few calls the agreement tests and bench/gguf.py need, with token ids in and out so tokenization is
checked separately: greedy continuation, teacher-forced logits, tokenization. Import fails cleanly
(ImportError) when the package is absent; nothing else in openr2 imports this module.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np


def load(path: str, n_ctx: int = 1024, n_threads: int | None = None, logits_all: bool = True):
    """A llama_cpp.Llama over the file, quiet, CPU; n_threads defaults to torch's thread count."""
    import llama_cpp
    import torch

    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        return llama_cpp.Llama(model_path=os.fspath(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
                               n_threads=n_threads or torch.get_num_threads(), n_batch=n_ctx, seed=0)


def logits(llm, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits [T, V] of one sequence (fresh context)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, ids: list[int], max_tokens: int, eos: int | None = None) -> list[int]:
    """Argmax continuation of `ids` (fresh context), stopping at eos (kept) or after max_tokens."""
    llm.reset()
    llm.eval(list(ids))
    out: list[int] = []
    for _ in range(max_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token == eos:
            break
        llm.eval([token])
    return out


def tokenize(llm, text: str) -> list[int]:
    """llama.cpp's tokenization (special tokens parsed, no BOS added): compare with Tokenizer.encode."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
