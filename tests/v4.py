"""Test helpers for DeepSeek-V4: recording the CSA indexers' scores (model/compressed.py's
`compressed_index_scores`), and checking that a comparison's top-k selection is decided by the model, not by
rounding (tests/dsa.py's rule, applied to V4's compressed entries)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

import openr2.model.compressed as compressed
from tests.dsa import assert_selection_decided
from tests.numerics import float64_compute, float64_copy


@contextlib.contextmanager
def recorded_scores() -> Iterator[list[torch.Tensor]]:
    """Within: every CSA indexer score matrix [B, T, N] computed is appended to the yielded list, in call order."""
    seen, original = [], compressed.compressed_index_scores

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.detach().clone())
        return out

    compressed.compressed_index_scores = recording
    try:
        yield seen
    finally:
        compressed.compressed_index_scores = original


def assert_decided(model, ids: torch.Tensor, what: str = "v4") -> float:
    """The float32 model's CSA selections on ids equal a float64 copy's, each by a margin rounding cannot cross.
    A query's scores depend only on the tokens up to it, so this covers every prefix of ids as well."""
    with recorded_scores() as s32, torch.no_grad():
        model(ids)
    with recorded_scores() as s64, float64_compute(), torch.no_grad():
        float64_copy(model)(ids)
    return assert_selection_decided(s32, s64, model.config.index_topk, what=what)
