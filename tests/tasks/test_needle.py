"""Tests for openr2/tasks/needle.py (passkey retrieval), its registration as a synthetic task and
`needle:LENGTH[:DEPTH]` in openr2/eval/tasks.py."""

from __future__ import annotations

import itertools
import random

import pytest

from openr2.eval.tasks import load_items, parse_needle
from openr2.tasks.needle import QUESTION, needle, needle_problem, needle_sentence
from openr2.tasks.synthetic import generate, held_out_problems, split_of, to_messages, verify
from openr2.train.mixture import parse_mixture


@pytest.mark.parametrize("length", [16, 300, 5000])
@pytest.mark.parametrize("depth", [0, 37, 100])
def test_needle_at_its_depth_in_filler_of_its_length(length, depth):
    p = needle_problem(4321, length, depth, filler_seed=7)
    haystack, question = p.prompt.rsplit("\n", 1)
    assert question == QUESTION and p.answer == "04321" and p.difficulty == length
    needle_at = haystack.index(needle_sentence("04321"))
    filler = len(haystack) - len(needle_sentence("04321")) - 1
    assert length <= filler < length + 40  # whole sentences up to the length (the longest filler is < 40)
    assert haystack.count("passkey") == 1
    # the needle sits at the sentence boundary nearest depth% of the filler
    assert abs(needle_at - depth / 100 * filler) <= 40
    assert verify(p, "04321") and verify(p, "4321") and not verify(p, "4322")
    assert to_messages(p)[-1]["content"].endswith("</think>\n\n04321")


def test_deterministic_by_seed_and_held_out_split_disjoint():
    a = [p.key for p in generate("needle", 200, "train", 20, seed=3)]
    assert a == [p.key for p in generate("needle", 200, "train", 20, seed=3)]
    assert a != [p.key for p in generate("needle", 200, "train", 20, seed=4)]
    test = held_out_problems("needle", 200, 10, seed=3)
    assert len(test) == 10 and all(split_of(p) == "test" for p in test)
    train = set(p.key for p in generate("needle", 200, "train", 2000, seed=3))
    assert not train & {p.key for p in test}
    rng = random.Random(0)
    depths = {int(needle(rng, 100).key.split(":")[2]) for _ in range(200)}
    assert min(depths) <= 5 and max(depths) >= 95  # any depth


def test_mixture_and_errors():
    (item,) = parse_mixture("needle:400")
    assert (item.task, item.difficulty) == ("needle", 400)
    with pytest.raises(ValueError, match="length"):
        needle_problem(1, 8, 50, 0)
    with pytest.raises(ValueError, match="depth"):
        needle_problem(1, 100, 101, 0)


def test_eval_task_needle():
    assert parse_needle("needle:500") == (500, None) and parse_needle("needle:500:25") == (500, 25)
    for bad in ("needle:", "needle:abc", "needle:500:200", "needle:5"):
        with pytest.raises(ValueError, match="needle"):
            load_items(bad)
    items = load_items("needle:300:50", limit=5, seed=1)
    assert len(items) == 5 and len({i.id for i in items}) == 5
    assert [i.id for i in items] == [i.id for i in load_items("needle:300:50", limit=5, seed=1)]
    for item in items:
        assert item.kind == "synthetic" and split_of(item.problem) == "test"
        assert item.problem.key.split(":")[2] == "50"
        assert item.messages[-1]["role"] == "user" and item.gold == item.problem.answer
    assert {i.id for i in load_items("needle:300", limit=5, seed=1)} != {i.id for i in items}
    assert list(itertools.islice(load_items("needle:300", limit=3), 3))
