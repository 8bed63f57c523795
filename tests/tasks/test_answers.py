"""The answer after `</think>` and the majority vote (openr2/tasks/answers.py)."""

from __future__ import annotations

from openr2.tasks.answers import answer_of, majority, split_think


def test_answer_of():
    assert answer_of("7+5=12\n</think>\n\n 12 ") == "12"
    assert answer_of("still thinking 12") is None


def test_split_think():
    assert split_think("<think>\nwork\n</think>\n\n12") == ("work", "12")
    assert split_think("a </think> b </think> c") == ("a </think> b", "c")  # the last one closes it
    assert split_think("no reasoning") == (None, None)


def test_majority():
    assert majority(["5", "3", "5", None], [True, False, True, False]) == ("5", True)
    assert majority(["3", "5", "5", "3"], [False, True, True, False]) == ("3", False)  # tie: first seen
    assert majority([None, "7", None, None], [False, False, False, False]) == ("7", False)  # None never votes
    assert majority([None, None], [False, False]) == (None, False)
