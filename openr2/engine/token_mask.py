"""Packed grammar masks (`TokenMask`) and their application to logits in place.

A `TokenMask` holds the masks of consecutive positions of one sequence as llguidance writes them: int32 words,
bit i of word w set when token 32 w + i is allowed (4 bits per 128 tokens: 16 KB per row at DeepSeek's 128K
vocabulary, where a bool row is 128 KB). Rows before `first` are free (they block nothing, as unconstrained
sampling does); in constrained rows, the model's tokens past the tokenizer's (`n_tok`) are blocked.

Two ways to apply a mask, held equal by the tests:
  - `blocked()`: the reference, and the path for GPU logits and other dtypes: numpy's unpackbits to a bool
    [n, V] tensor, then masked_fill (sampling.apply_blocked);
  - `apply_(x)`: float32 CPU logits, in place, one pass over the packed words in C (token_mask.c: nothing to do
    for a word of allowed tokens, a fill for a blocked word, one store per blocked token otherwise). Built on
    first use with the system C compiler (a plain C file: under a second, where a torch extension takes
    30-120 s), loaded through ctypes; without a compiler the reference path is used.

Why C: at a 128K vocabulary the reference costs ~40 us for a row allowing one token and ~220 us inside a JSON
string (most tokens allowed, the blocked ones scattered), in several passes over 128K elements, some of them
OpenMP regions that wait for a busy second thread on a loaded machine (bench/structured.py); numpy-only forms
measured 25-500 us. The C loop does one pass and no allocation.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "token_mask.c")
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99"]


@dataclass
class TokenMask:
    """bits [n, W] int32 (llguidance's layout, W >= ceil(n_tok / 32)), rows before `first` free; n_tok: the
    tokenizer's vocabulary (tokens at or past it are blocked in constrained rows)."""

    bits: np.ndarray
    first: int
    n_tok: int
    use_kernel: bool = True  # False: always the reference path (benchmarks, tests)

    @property
    def num_rows(self) -> int:
        return self.bits.shape[0]

    def blocked(self, vocab_size: int) -> torch.Tensor:
        """bool [n, vocab_size], True where refused (the reference): numpy's unpackbits, ~10 us at 128K."""
        n, n_tok = self.num_rows, min(self.n_tok, vocab_size)
        out = np.ones((n, vocab_size), dtype=np.uint8)
        out[:, :n_tok] = np.unpackbits(np.invert(self.bits).view(np.uint8), axis=1, count=n_tok, bitorder="little")
        out[: self.first] = 0
        return torch.from_numpy(out.view(np.bool_))

    def apply_(self, x: torch.Tensor) -> None:
        """x [n, V] logits: the blocked tokens of the constrained rows become -inf, in place."""
        if x.shape[0] != self.num_rows:
            raise ValueError(f"a mask of {self.num_rows} rows for {x.shape[0]} logits rows")
        rows = x[self.first:]
        if not len(rows):
            return
        lib = _kernel() if self.use_kernel else None
        if lib is None or rows.device.type != "cpu" or rows.dtype != torch.float32 or rows.stride(-1) != 1:
            rows.masked_fill_(self.blocked(x.shape[1])[self.first:].to(rows.device), float("-inf"))
            return
        bits = np.ascontiguousarray(self.bits[self.first:])
        lib.openr2_apply_token_bitmask(rows.data_ptr(), rows.stride(0), bits.ctypes.data, bits.shape[1], len(rows),
                                       self.n_tok, rows.shape[1])


_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: cannot be built here
_lock = threading.Lock()


def _kernel() -> ctypes.CDLL | None:
    global _lib
    if _lib is False:
        with _lock:
            if _lib is False:
                _lib = _load()
    return _lib


def _load() -> ctypes.CDLL | None:
    """The compiled token_mask.c (built once per source and flags into the cache), or None with a warning."""
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), sys.platform.encode()])).hexdigest()[:16]
    folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "openr2", "kernels")
    path = os.path.join(folder, f"token_mask_{key}.so")
    if not os.path.isfile(path):
        compiler, tmp = os.environ.get("CC", "cc"), None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so")
            os.close(fd)
            subprocess.run([compiler, *_FLAGS, "-o", tmp, _SOURCE], check=True, capture_output=True, timeout=120)
            os.replace(tmp, path)  # whole or not at all: another process may load it at any moment
        except (OSError, subprocess.SubprocessError) as e:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
            detail = getattr(e, "stderr", b"") or b""
            log.warning("grammar masks: cannot build %s with %s (%s %s); using the slower numpy path",
                        _SOURCE, compiler, e, detail.decode(errors="replace")[:500])
            return None
    lib = ctypes.CDLL(path)
    f = lib.openr2_apply_token_bitmask
    f.restype = None
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_int64]
    return lib
