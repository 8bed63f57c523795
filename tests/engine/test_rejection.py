"""sample_with_drafts: exact rejection sampling of drafted tokens (engine/rejection.py).

The committed tokens must be distributed exactly as one-at-a-time sampling draws them, whatever the
drafts; rows without drafts must be drawn exactly as `sample` draws them; greedy rows accept exactly the
drafts that equal the argmax; seeded rows reproduce.
"""

from __future__ import annotations

import math

import pytest
import torch

from openr2.engine.rejection import sample_with_drafts
from openr2.engine.sampling import SamplingParams, make_generator, sample


def _shaped_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution one-at-a-time sampling draws from (temperature and top-k here), in float64."""
    x = logits.double() / p.temperature
    if p.top_k > 0:
        kth = x.topk(p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    return x.softmax(-1)


def test_rows_without_drafts_equal_sample():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=3),
              SamplingParams(temperature=1.2, top_p=0.9, seed=4, repetition_penalty=1.3),
              SamplingParams(temperature=0.7, top_k=5, seed=5, logprobs=3)]
    prompts = [[1, 2], [3], [4, 5, 6], [7]]
    outputs = [[8], [9, 9], [2, 4], []]
    want = sample(logits, params, [make_generator(p.seed) for p in params], prompts, outputs).tolist()
    got = sample_with_drafts(logits, [[]] * 4, params, [make_generator(p.seed) for p in params], prompts, outputs)
    assert [g[0].token_id for g in got] == [w.token_id for w in want]
    assert got[3][0].logprob == pytest.approx(want[3].logprob, abs=1e-6)
    assert [t for t, _ in got[3][0].top] == [t for t, _ in want[3].top]


def test_greedy_accepts_exactly_the_argmax_prefix():
    logits = torch.full((4, 10), -5.0)
    for pos, tok in enumerate([3, 7, 1, 4]):
        logits[pos, tok] = 5.0
    params = [SamplingParams(temperature=0)]
    assert [t.token_id for t in sample_with_drafts(logits, [[3, 7, 1]], params)[0]] == [3, 7, 1, 4]
    assert [t.token_id for t in sample_with_drafts(logits, [[3, 2, 1]], params)[0]] == [3, 7]
    assert [t.token_id for t in sample_with_drafts(logits, [[0, 7, 1]], params)[0]] == [3]


def test_penalties_see_the_drafts_before_each_position():
    # position 1's argmax is token 2 only without a penalty on it; draft 0 = 2 makes it a repeat
    logits = torch.tensor([[0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 2.0, 1.9]])
    params = [SamplingParams(temperature=0, repetition_penalty=2.0)]
    out = sample_with_drafts(logits, [[2]], params, None, [[0]], [[]])[0]
    assert [t.token_id for t in out] == [2, 3]


@pytest.mark.parametrize("draft", [0, 2, 4])  # the likeliest token, a mid one, one top-k masks out
def test_committed_tokens_have_the_target_distribution(draft):
    """First token: P(x) = p0(x) for every x. Second token, given the first was the accepted draft: p1."""
    torch.manual_seed(1)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.3, -0.2, 1.1, 0.0, 0.4]])
    p = SamplingParams(temperature=0.9, top_k=4)
    p0, p1 = _shaped_probs(logits[0], p), _shaped_probs(logits[1], p)
    n = 12000
    gen = torch.Generator().manual_seed(7)
    first = torch.zeros(5, dtype=torch.float64)
    second = torch.zeros(5, dtype=torch.float64)
    for _ in range(n):
        ids = [t.token_id for t in sample_with_drafts(logits, [[draft]], [p], [gen])[0]]
        first[ids[0]] += 1
        if len(ids) == 2:
            assert ids[0] == draft
            second[ids[1]] += 1
    # 5 binomial standard deviations per token: the bound holds for an exact sampler except with
    # probability < 1e-5 per token, and a sampler off by the draft's weight fails it by far
    sd = (p0 * (1 - p0) / n).sqrt()
    assert ((first / n - p0).abs() <= 5 * sd + 1e-12).all(), (first / n, p0)
    m = second.sum()
    assert m == first[draft]
    if m:
        sd1 = (p1 * (1 - p1) / m).sqrt()
        assert ((second / m - p1).abs() <= 5 * sd1 + 1e-12).all(), (second / m, p1)
    assert math.isclose(float(p0[4]), 0.0) or draft != 4


def test_seeded_rows_reproduce_and_rows_do_not_disturb_each_other():
    torch.manual_seed(2)
    logits = torch.randn(8, 30)
    drafts = [[1, 2], [3], [4, 5]]
    params = [SamplingParams(temperature=1.0, seed=s) for s in (11, 12, 13)]

    def run(order):
        out = sample_with_drafts(logits[_positions(drafts, order)], [drafts[i] for i in order],
                                 [params[i] for i in order], [make_generator(params[i].seed) for i in order])
        return {i: [t.token_id for t in o] for i, o in zip(order, out)}

    assert run([0, 1, 2]) == run([0, 1, 2]) == run([2, 0, 1])


def _positions(drafts, order):
    starts = [0]
    for d in drafts:
        starts.append(starts[-1] + len(d) + 1)
    return [m for i in order for m in range(starts[i], starts[i + 1])]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="positions"):
        sample_with_drafts(torch.zeros(2, 4), [[1, 2]], [SamplingParams()])
