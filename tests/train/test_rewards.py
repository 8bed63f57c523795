"""Reward sources on known strings: verifiable, format, majority vote (ties, unparsable answers), the
self-judge parser and voting, combination weights."""

from __future__ import annotations

import pytest

from openr2.tasks.synthetic import Problem, addition_problem, countdown_problem
from openr2.train import rewards as R

ADD = addition_problem(347, 589)  # 936


def _c(answer: str, reasoning: str = "7+9+0=16, write 6 carry 1") -> str:
    return f"{reasoning}\n</think>\n\n{answer}"


def test_answer_text_and_normalisation():
    assert R.answer_text(_c(" 936 ")) == "936"
    assert R.answer_text("no end of reasoning 936") is None
    assert R.answer_text("x\n</think>\n\n   ") is None
    assert R.normalize_answer("1,000.") == "1000" and R.normalize_answer("+42") == "42"
    assert R.normalize_answer("x  =  3") == "x = 3"


def test_verifiable():
    scores = [r.score for r in R.verifiable(ADD, [_c("936"), _c("935"), "936", _c("0936")])]
    assert scores == [1.0, 0.0, 0.0, 1.0]
    cd = countdown_problem([3, 5, 7], 22)
    assert [r.score for r in R.verifiable(cd, [_c("3*5+7"), _c("7*3+5"), _c("3*5*7")])] == [1.0, 0.0, 0.0]
    gsm = Problem("gsm8k", 0, "q", "w", "1000", "gsm8k:q")
    assert R.verifiable(gsm, [_c("1,000")])[0].score == 1.0


def test_verifiable_uses_math_verify_for_latex():
    math = Problem("math", 0, "q", "w", "\\frac{1}{2}", "math:q")
    assert [r.score for r in R.verifiable(math, [_c("0.5"), _c("\\frac{2}{4}"), _c("1/3")])] == [1.0, 1.0, 0.0]


def test_format_reward():
    good, two_lines = _c("936"), _c("936\nmore")
    scores = [r.score for r in R.format_reward(ADD, [good, two_lines, "936", "a</think>\n\n936", "<think>x\n</think>\n\n1",
                                                      good + "\n</think>\n\n1"])]
    assert scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_majority_vote_with_ties_and_unparsable_answers():
    group = [_c("936"), _c("936"), _c("935"), "unfinished", _c("1,000"), _c("1000")]
    # 936 and 1000 tie (2 votes each): no pseudo-label, nobody is rewarded
    assert R.majority_label(group) is None
    assert all(r.score == 0 for r in R.majority(ADD, group))
    group.append(_c("936."))  # now 936 leads 3-2
    assert R.majority_label(group) == "936"
    assert [r.score for r in R.majority(ADD, group)] == [1, 1, 0, 0, 0, 0, 1]
    assert R.majority_label(["a", "b"]) is None  # nobody answered
    wrong_majority = Problem("addition", 3, ADD.prompt, "", "999", ADD.key)  # the vote never reads the truth
    assert [r.score for r in R.majority(wrong_majority, group)] == [1, 1, 0, 0, 0, 0, 1]


@pytest.mark.parametrize("text, verdict", [
    ("I recompute: 936.\nVerdict: correct", 1.0),
    ("Verdict: incorrect", 0.0),
    ("verdict = Correct", 1.0),
    ("Verdict: correct ... wait. Verdict: incorrect", 0.0),  # the last verdict counts
    ("thinking Verdict: correct\n</think>\n\nVerdict: wrong", 0.0),  # only after the reasoning
    ("Verdict: **correct**", 1.0),
    ("looks fine to me", None),
    ("Verdict: maybe", None),
])
def test_parse_verdict(text, verdict):
    assert R.parse_verdict(text) == verdict


def test_judge_votes_over_k_samples():
    asked = []

    def generate(prompts, k):
        asked.append((prompts, k))
        return [["Verdict: correct", "Verdict: correct", "Verdict: incorrect", "no idea"] for _ in prompts]

    judge = R.make_judge(generate, samples=4)
    out = judge(ADD, [_c("936"), "unfinished"])
    assert out[0].score == pytest.approx(2 / 3) and out[1].score == 0.0
    prompts, k = asked[0]
    assert k == 4 and len(prompts) == 1 and "347+589" in prompts[0] and "Proposed answer: 936" in prompts[0]


def test_combine_and_spec():
    w = R.parse_reward_spec("majority:1, format:0.1")
    assert w == {"majority": 1.0, "format": 0.1}
    totals, parts = R.combine(ADD, [_c("936"), _c("936"), "x"], w)
    assert totals == pytest.approx([1.1, 1.1, 0.0]) and set(parts) == {"majority", "format"}
    for bad in ("", "nope:1", "format:x", "format:0"):
        with pytest.raises(ValueError, match="rewards"):
            R.parse_reward_spec(bad)
    with pytest.raises(ValueError, match="judge"):
        R.combine(ADD, [_c("1")], {"judge": 1.0})


def test_majority_votes_by_value_and_numbers_used():
    """Equivalent answers are one vote (TTRL compares answers by equivalence): countdown expressions by value
    and the numbers they use, so reaching the target with numbers never given is a different answer."""
    cd = countdown_problem([3, 5, 7], 22)
    group = [_c("3*5+7"), _c("7+3*5"), _c("(7+3)*5"), _c("5*3+7=22"), _c("50"), _c("11+11"), _c("11*2")]
    assert R.normalize_answer("7+3*5") == "22 from 3,5,7" and R.normalize_answer("7/2") == "7/2 from 2,7"
    assert R.normalize_answer("11+11") != R.normalize_answer("3*5+7")
    assert R.normalize_answer("x+1") == "x+1" and R.normalize_answer("5-") == "5-"
    assert R.majority_label(group) == "22 from 3,5,7"
    assert [r.score for r in R.majority(cd, group)] == [1, 1, 0, 1, 0, 0, 0]


def test_majority_min_share_keeps_only_confident_pseudo_labels():
    group = [_c("936"), _c("936"), _c("936"), _c("937"), _c("935"), _c("1"), _c("2"), "no answer"]
    assert R.majority_label(group) == "936"
    assert R.majority_label(group, min_share=0.375) == "936"  # 3 of 8 votes
    assert R.majority_label(group, min_share=0.5) is None
    assert [r.score for r in R.majority(ADD, group, min_share=0.5)] == [0.0] * 8
    totals, _ = R.combine(ADD, group, {"majority": 1.0}, majority_min_share=0.5)
    assert totals == [0.0] * 8
