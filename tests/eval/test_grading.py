"""Answer extraction and grading on the tricky cases (openr2/eval/grading.py)."""

from __future__ import annotations

import pytest

from openr2.eval import grading
from openr2.eval.tasks import Item, load_items


def _item(gold: str, kind: str = "math", choices=None) -> Item:
    return Item("t", [{"role": "user", "content": "q"}], gold, kind, choices or [])


@pytest.mark.parametrize("gold, reply", [
    ("\\frac{1}{2}", "So the result is \\boxed{0.5}."),
    ("0.5", "\\boxed{\\frac{1}{2}}"),
    ("0.5", "\\boxed{\\dfrac12}"),
    ("1000", "The total is \\boxed{1,000}."),
    ("1000", "The answer is 1,000."),
    ("18", "She makes \\boxed{\\$18} every day."),
    ("18", "\\boxed{18 \\text{ dollars}}"),
    ("18", "The answer is 18 dollars."),
    ("18", "The answer is $18."),
    ("5", "\\boxed{5\\text{ cm}}"),
    ("42", "The answer is 42."),
    ("42", "Adding up, 40 + 2 gives 42"),  # last number
    ("7", "First \\boxed{3}, but on reflection \\boxed{7}"),  # multiple boxed: last wins
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}"),
    ("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}"),
    ("\\frac{14}{3}", "The final answer is $\\frac{14}{3}$."),
])
def test_math_correct(gold, reply):
    extracted, correct = grading.grade(_item(gold), reply)
    assert correct, (gold, reply, extracted)


@pytest.mark.parametrize("gold, reply", [
    ("7", "First \\boxed{7}, but on reflection \\boxed{3}"),  # the last boxed answer is the answer
    ("\\frac{1}{2}", "\\boxed{0.25}"),
    ("42", "I am not sure."),
    ("1000", "\\boxed{100}"),
])
def test_math_wrong(gold, reply):
    assert not grading.grade(_item(gold), reply)[1]


def test_boxed_nested_braces():
    assert grading.boxed_contents("x \\boxed{\\frac{a}{b^{2}}} y \\boxed{\\text{(B)}}") == ["\\frac{a}{b^{2}}", "\\text{(B)}"]
    assert grading.boxed_contents("\\boxed{unclosed") == []
    assert grading.extract_math("the answer is \\boxed{\\text{no {nested} problem}}") == "\\text{no {nested} problem}"


@pytest.mark.parametrize("reply, letter", [
    ("(B)", "B"),
    ("B", "B"),
    ("B.", "B"),
    ("C) Planetary days will become shorter.", "C"),
    ("The answer is (C).", "C"),
    ("The answer is C because days get shorter.", "C"),
    ("Answer: D", "D"),
    ("**Answer:** (A)", "A"),
    ("After checking each option:\n\n**B**", "B"),
    ("Answer: **C**", "C"),
    ("\\boxed{\\text{(D)}}", "D"),
    ("\\boxed{B}", "B"),
    ("Options (A) and (C) are wrong, so it must be (B)", "B"),
    ("A common mistake is to pick the first option.", None),  # "A" as a word is not a choice
    ("(E)", None),  # out of range for four choices
])
def test_choice_letters(reply, letter):
    assert grading.extract_choice(reply, 4) == letter
    item = _item(letter or "A", "choice", ["w", "x", "y", "z"])
    assert grading.grade(item, reply)[1] == (letter is not None)


@pytest.mark.parametrize("reply, value", [
    ("\\boxed{033}", 33), ("The answer is 204.", 204), ("\\boxed{1,000}", 1000), ("\\boxed{\\frac{1}{2}}", 2),
    ("so 12.0", 12), ("\\boxed{2.5}", None), ("nothing", None),
])
def test_integer_exact(reply, value):
    assert grading.extract_integer(reply) == value


def test_integer_grading_is_exact():
    item = _item("33", "integer")
    assert grading.grade(item, "\\boxed{033}") == ("33", True)
    assert grading.grade(item, "\\boxed{34}") == ("34", False)
    assert grading.grade(item, "no idea") == (None, False)


def test_synthetic_uses_the_training_verifier():
    item = load_items("synthetic:countdown:3", limit=1)[0]
    assert grading.grade(item, item.gold)[1]
    assert grading.grade(item, f"\\boxed{{{item.gold}}}")[1]
    assert not grading.grade(item, "1+1")[1]
    add = load_items("synthetic:addition:3", limit=1)[0]
    assert grading.grade(add, f"{int(add.gold):,}.")[1]
