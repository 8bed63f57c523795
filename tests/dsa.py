"""Test helpers for DeepSeek Sparse Attention (V3.2): recording the indexer's scores, and checking that a
comparison's top-k selection is decided by the model, not by rounding.

Sparse attention is discontinuous: a key whose score sits at the top-k boundary within rounding of its
neighbour may be kept by one float32 implementation and dropped by another (or by the float64 reference).
Two implementations of one function then legitimately differ by a whole key's contribution, and no
tolerance is right. So a comparison first checks that the problem is well posed: at every query that has
more than K visible keys, the float64 reference's gap between its K-th and (K+1)-th score exceeds FACTOR
times that query's float32 score error against the reference (tests/numerics.py's factor: two float32
implementations' errors are of one size), which no float32 run can cross. Score errors grow along the
layers; a gap is compared with its own query's error. The test seeds leave every ratio well above FACTOR
(pytest -s prints the smallest); a seed or prompt that put a near-tie at the boundary fails here, with that
said, instead of failing (or passing) the comparison by luck.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

import openr2.model.indexer as indexer_module
import openr2.model.mla as mla_module
from tests.numerics import FACTOR, float64_compute, float64_copy


@contextlib.contextmanager
def recorded_index_scores() -> Iterator[list[torch.Tensor]]:
    """Within: every indexer score matrix computed (by the model without a cache, or by LatentCache) is
    appended to the yielded list, in call order (layer by layer)."""
    seen: list[torch.Tensor] = []
    original = indexer_module.index_scores

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.detach().clone())
        return out

    indexer_module.index_scores = mla_module.index_scores = recording
    try:
        yield seen
    finally:
        indexer_module.index_scores = mla_module.index_scores = original


def index_scores_of(model, *args, **kwargs) -> list[torch.Tensor]:
    with recorded_index_scores() as seen, torch.no_grad():
        model(*args, **kwargs)
    return seen


def index_scores64_of(model, *args, **kwargs) -> list[torch.Tensor]:
    """The scores of a float64 copy of `model` (tests/numerics.py), floating arguments cast to float64."""
    up = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    with float64_compute():
        return index_scores_of(float64_copy(model), *up, **kwargs)


def assert_selection_decided(scores32: list[torch.Tensor], scores64: list[torch.Tensor], k: int,
                             what: str = "") -> float:
    """At every query with more than k visible keys (every layer), the float64 scores' gap between the k-th
    and (k+1)-th key exceeds FACTOR x that query's float32 score error (its largest over the keys); float32
    and float64 select the same keys. Returns the smallest gap / error ratio."""
    assert scores32 and len(scores32) == len(scores64), (len(scores32), len(scores64))
    worst, decided = float("inf"), 0
    for layer, (s32, s64) in enumerate(zip(scores32, scores64)):
        assert s64.dtype == torch.float64
        visible = torch.isfinite(s64)
        assert torch.equal(visible, torch.isfinite(s32)), f"{what} layer {layer}: different causal masks"
        rows = visible.sum(-1) > k  # queries where the indexer drops keys
        if not rows.any():
            continue
        decided += int(rows.sum())
        err = (s32.double() - s64).masked_fill(~visible, 0.0).abs().amax(-1)  # [B, T]
        top = s64.topk(k + 1, dim=-1).values
        gap = top[..., k - 1] - top[..., k]
        ratio = (gap / err.clamp(min=torch.finfo(torch.float64).tiny))[rows]
        worst = min(worst, ratio.min().item())
        assert (ratio > FACTOR).all(), (
            f"{what} layer {layer}: a top-{k} boundary gap is within {FACTOR:g} x its query's float32 score error "
            f"(ratio {ratio.min().item():.3g}): rounding could decide the selection; choose another seed or prompt")
        sel32 = s32.topk(k, dim=-1).indices.sort(-1).values[rows]
        sel64 = s64.topk(k, dim=-1).indices.sort(-1).values[rows]
        assert torch.equal(sel32, sel64), f"{what} layer {layer}: float32 and float64 select different keys"
    assert decided > 0, f"{what}: no query has more than {k} visible keys; the selection decides nothing"
    print(f"{what or 'selection'}: {decided} queries select, smallest top-{k} gap / float32 error {worst:.3g}")
    return worst


@contextlib.contextmanager
def dense_indexers(model) -> Iterator[None]:
    """Within: every indexer of `model` keeps all keys (index_topk beyond any context): dense MLA."""
    indexers = [m for m in model.modules() if isinstance(m, indexer_module.Indexer)]
    saved = [m.index_topk for m in indexers]
    for m in indexers:
        m.index_topk = 1 << 30
    try:
        yield
    finally:
        for m, k in zip(indexers, saved):
            m.index_topk = k
