"""pass@k, maj@k and the summary (openr2/eval/metrics.py)."""

from __future__ import annotations

import math

import pytest

from openr2.eval import metrics


@pytest.mark.parametrize("n, c, k", [(1, 0, 1), (1, 1, 1), (4, 1, 1), (4, 1, 2), (4, 2, 3), (10, 3, 5), (16, 0, 8),
                                     (16, 16, 16), (64, 5, 8), (200, 37, 100)])
def test_pass_at_k_closed_form(n, c, k):
    closed = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert metrics.pass_at_k(n, c, k) == pytest.approx(closed, rel=1e-12, abs=1e-12)


def test_pass_at_k_by_hand():
    assert metrics.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert metrics.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert metrics.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert metrics.pass_at_k(3, 2, 2) == 1.0  # any 2 of 3 include a correct one
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 1, 4)


def test_ks_for():
    assert metrics.ks_for(1) == [1]
    assert metrics.ks_for(4) == [1, 2, 4]
    assert metrics.ks_for(6) == [1, 2, 4, 6]


def _sample(correct, extracted="1", tokens=10):
    return {"correct": correct, "extracted": extracted, "finish_reason": "stop", "prompt_tokens": 5,
            "completion_tokens": tokens, "reasoning_tokens": tokens // 2}


def test_summarize():
    items = [{"samples": [_sample(True), _sample(False), _sample(True), _sample(False, None)], "maj_correct": True,
              "cost_pico_usd": 7},
             {"samples": [_sample(False)] * 4, "maj_correct": False, "cost_pico_usd": 3},
             {"samples": [_sample(True)] * 2, "maj_correct": True, "cost_pico_usd": 1}]  # unfinished: left out
    s = metrics.summarize(items, 4)
    assert s["items"] == 2
    assert s["pass@1"] == pytest.approx((0.5 + 0) / 2)
    assert s["pass@2"] == pytest.approx((metrics.pass_at_k(4, 2, 2) + 0) / 2)
    assert s["pass@4"] == pytest.approx(0.5)
    assert s["maj@4"] == pytest.approx(0.5)
    assert s["answered"] == pytest.approx(7 / 8)
    assert s["mean_completion_tokens"] == 10 and s["cost_pico_usd"] == 10
