"""A reply's answer: the text after the reasoning, and the majority vote over several replies' answers.

The one place that splits a whole reply at `</think>` (training-time accuracy, rewards and the eval
backends all call `split_think`); the server's streaming split, which must decide delta by delta, is
chat_format.ReasoningParser. Grading what the answer says belongs to the task (synthetic.verify) or
the benchmark (eval/grading.py).
"""

from __future__ import annotations

from collections import Counter

from openr2.tokenizer import THINK_END, THINK_START


def split_think(text: str) -> tuple[str | None, str | None]:
    """(reasoning, answer) of a reply that keeps its `<think>...</think>`, split at the last `</think>`:
    the reasoning without its opening `<think>`, both stripped; (None, None) when `</think>` never came
    (a reply whose reasoning never closes has no answer)."""
    if THINK_END not in text:
        return None, None
    reasoning, answer = text.rsplit(THINK_END, 1)
    return reasoning.replace(THINK_START, "", 1).strip(), answer.strip()


def answer_of(completion: str) -> str | None:
    """The answer after the reasoning, or None when `</think>` never came."""
    return split_think(completion)[1]


def majority(answers: list[str | None], correct: list[bool]) -> tuple[str | None, bool]:
    """(the most common answer, whether it is correct); (None, False) when no sample answered.
    Ties go to the answer seen first; None (no answer) never votes."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None, False
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)  # ties: first seen
    return winner, any(ok for a, ok in zip(answers, correct) if a == winner)
