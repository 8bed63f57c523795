"""Run an exported GGUF in llama.cpp through llama-cpp-python (optional: `make bench-deps` installs it).

Owns the few calls the agreement tests and bench/gguf.py need, with token ids in and out so tokenization is
checked separately: greedy continuation, teacher-forced logits, tokenization. Import fails cleanly
(ImportError) when the package is absent; nothing else in openr2 imports this module.

llama.cpp's AMX kernels (ggml-cpu/amx, used for Q4_0/Q4_1/Q8_0/K-quant products with more than one row when
the build has AMX_INT8, as a -march=native build on a Sapphire Rapids CPU does) crash: GCC 12 drops the stores
that fill the on-stack tile configuration, `ldtilecfg` reads a zeroed colsb and stale rows and faults
(SIGSEGV in ggml_backend_amx_mul_mat; ggml-org/llama.cpp issue 20824, fix proposed in PR 26954). The AMX
buffer also takes F16 weights whose real product it then refuses (attn_k_b with rows of 16 times a permuted
q_nope: GGML_ASSERT(*cur_backend_id != -1) in the scheduler). `load` therefore turns llama.cpp's extra
(repacking) weight buffers off in such builds, as llama.cpp's `--no-repack` does.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np


def has_amx_kernels() -> bool:
    """Whether this llama.cpp build runs quantized products through its (crashing) AMX kernels."""
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


@contextlib.contextmanager
def _model_params(**fields):
    """Llama() takes no argument for some llama_model_params fields: set them on the defaults it starts from."""
    import llama_cpp.llama_cpp as api

    default = api.llama_model_default_params

    def params():
        p = default()
        for name, value in fields.items():
            setattr(p, name, value)
        return p

    api.llama_model_default_params = params
    try:
        yield
    finally:
        api.llama_model_default_params = default


def load(path: str, n_ctx: int = 1024, n_threads: int | None = None, logits_all: bool = True, f32_cache: bool = True,
         extra_buffers: bool | None = None):
    """A llama_cpp.Llama over the file, quiet, CPU; n_threads defaults to torch's thread count.

    f32_cache: keep llama.cpp's KV cache in F32 (its default is F16, which alone moves logits by ~1e-3), so
    an F32 export can be compared exactly; pass False to measure the default setup.
    extra_buffers: llama.cpp's repacked weight buffers (AMX, CPU_REPACK); None = on unless the build has the
    crashing AMX kernels (see the module docstring)."""
    import llama_cpp
    import torch

    if extra_buffers is None:
        extra_buffers = not has_amx_kernels()
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull), \
            _model_params(use_extra_bufts=extra_buffers):
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
