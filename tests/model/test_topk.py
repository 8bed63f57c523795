"""model/topk.py: the two-stage top-k selects torch.topk's values (ties, -inf, k >= N), indices in range."""

import pytest
import torch

from openr2.model import topk
from openr2.model.topk import top_k_indices


def _check(scores: torch.Tensor, k: int) -> None:
    got = top_k_indices(scores, k)
    want = scores.topk(min(k, scores.shape[-1]), dim=-1)
    assert got.shape == want.indices.shape and got.dtype == torch.int64
    assert ((got >= 0) & (got < scores.shape[-1])).all()
    for picked in got.flatten(0, -2):
        assert picked.unique().numel() == picked.numel()  # no index twice
    # the same values, in the same (descending) order; the same set of indices above the k-th value (only the
    # ties at the k-th value may be taken differently)
    assert torch.equal(scores.gather(-1, got), want.values)
    above = want.values != want.values[..., -1:]
    assert torch.equal(got.masked_fill(~above, -1).sort(dim=-1).values,
                       want.indices.masked_fill(~above, -1).sort(dim=-1).values)


@pytest.mark.parametrize("two_stage", [True, False])
def test_top_k_equals_torch_topk(two_stage, monkeypatch):
    if two_stage:  # every row through both stages, short ones included
        monkeypatch.setattr(topk, "TWO_STAGE_MIN_RATIO", 0)
    g = torch.Generator().manual_seed(0)
    for n, k in [(1000, 7), (4096, 16), (5000, 33), (257, 8), (64, 64), (50, 80), (300, 0), (31, 1), (200, 7)]:
        scores = torch.randn(2, 3, n, generator=g)
        _check(scores, k)
        ties = torch.randint(0, 5, (2, 3, n), generator=g).float()  # few values: many ties at the k-th
        _check(ties, k)
        masked = scores.masked_fill(torch.rand(2, 3, n, generator=g) < 0.9, float("-inf"))
        _check(masked, k)
        causal = scores.masked_fill(torch.arange(n) > torch.randint(0, n, (2, 3, 1), generator=g), float("-inf"))
        _check(causal, k)  # fewer visible than k in some rows: the -inf picks fill in, indices still < N
        _check(torch.full((1, n), float("-inf")), k)
        _check(scores.double(), k)


def test_top_k_long_row_takes_two_stages():
    n, k = 4 * topk.TWO_STAGE_MIN_RATIO * 16 * topk.GROUP + 5, 16
    scores = torch.randn(3, n, generator=torch.Generator().manual_seed(1))
    scores[0, -3:] = 100.0  # the largest among the trailing scores that fill no group
    _check(scores, k)
    assert set(top_k_indices(scores, k)[0, :3].tolist()) == {n - 3, n - 2, n - 1}


def test_top_k_rejects_negative_k():
    with pytest.raises(ValueError, match="k >= 0"):
        top_k_indices(torch.zeros(4), -1)
