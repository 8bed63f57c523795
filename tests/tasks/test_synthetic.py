"""Tests for openr2/tasks/synthetic.py: generator correctness (checked independently), split hygiene,
determinism and the countdown verifier."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from fractions import Fraction

import pytest

from openr2.tasks.synthetic import (
    JUDGE_PROMPT,
    TASKS,
    Problem,
    addition_problem,
    countdown_problem,
    generate,
    modular_problem,
    split_of,
    subtraction_problem,
    sum_problem,
    verify,
)

N_PER_DIFFICULTY = 2000


def _digit(n: int, i: int) -> int:
    return n // 10 ** i % 10


def _exact(expr: str) -> Fraction:
    """Evaluate a vetted arithmetic string exactly (test-side oracle, independent of tasks.parse_expression)."""
    assert re.fullmatch(r"[\d+\-*/() ]+", expr), expr
    return eval(re.sub(r"(\d+)", r"Fraction(\1)", expr), {"Fraction": Fraction})  # noqa: S307 - vetted charset


def _problems(task: str):
    spec = TASKS[task]
    for d in range(spec.min_difficulty, spec.max_difficulty + 1):
        rng = random.Random(d)
        for _ in range(N_PER_DIFFICULTY):
            p = spec.generator(rng, d)
            assert p.task == task and p.difficulty == d
            yield p


def _check_columns(p: Problem, a: int, b: int, op: str) -> None:
    lines = p.reasoning.split("\n")
    assert lines.pop(0) == f"Problem: {a}{op}{b}"  # the working restates the question first
    n = max(len(str(a)), len(str(b)))
    carry = 0
    word = "carry" if op == "+" else "borrow"
    for i in range(n):
        m = re.fullmatch(rf"(\d)\{op}(\d)\{op}(\d)=(-?\d+), write (\d) {word} (\d)", lines[i])
        assert m, lines[i]
        x, y, c, s, w, k = map(int, m.groups())
        assert (x, y, c) == (_digit(a, i), _digit(b, i), carry)
        if op == "+":
            assert s == x + y + c and w == s % 10 and k == s // 10
        else:  # a negative column difference writes it plus ten and borrows
            assert s == x - y - c and w == s % 10 and k == (s < 0)
        carry = k
    rest = lines[n:]
    if op == "+" and carry:
        assert rest.pop(0) == f"write carry {carry}"
    result = a + b if op == "+" else a - b
    assert rest == [f"{a}{op}{b}={result}"]
    assert p.answer == str(result) and verify(p, p.answer) and not verify(p, str(result + 1))


def test_addition_and_subtraction_columns():
    for task, op in (("addition", "+"), ("subtraction", "-")):
        for p in _problems(task):
            a, b = map(int, re.fullmatch(rf"What is (\d+)\{op}(\d+)\?", p.prompt).groups())
            assert max(len(str(a)), len(str(b))) == p.difficulty
            _check_columns(p, a, b, op)


def test_demo_question_347_plus_589():
    p = addition_problem(347, 589)
    assert p.prompt == "What is 347+589?" and p.answer == "936"
    assert p.reasoning.split("\n") == ["Problem: 347+589", "7+9+0=16, write 6 carry 1", "4+8+1=13, write 3 carry 1",
                                       "3+5+1=9, write 9 carry 0", "347+589=936"]
    assert subtraction_problem(512, 199).reasoning.split("\n") == [
        "Problem: 512-199", "2-9-0=-7, write 3 borrow 1", "1-9-1=-9, write 1 borrow 1", "5-1-1=3, write 3 borrow 0",
        "512-199=313"]
    assert split_of(p) == split_of(addition_problem(589, 347))  # commuted problems share a split
    assert subtraction_problem(1000, 1).answer == "999"
    with pytest.raises(ValueError):
        subtraction_problem(1, 2)


def test_multiplication_partial_products():
    for p in _problems("multiplication"):
        a, b = map(int, re.fullmatch(r"What is (\d+)\*(\d+)\?", p.prompt).groups())
        lines = p.reasoning.split("\n")
        assert lines.pop(0) == f"Problem: {a}*{b}"
        parts = []
        for i in range(len(str(b))):
            x, y, v = map(int, re.fullmatch(r"(\d+)\*(\d+)=(\d+)", lines[i]).groups())
            assert x == a and y == _digit(b, i) * 10 ** i and v == x * y
            parts.append(v)
        if len(parts) > 1:
            assert lines[len(parts):] == [f"{'+'.join(map(str, parts))}={a * b}", f"{a}*{b}={a * b}"]
        else:
            assert len(lines) == 1
        assert p.answer == str(a * b) and verify(p, p.answer)


def test_sum_running_total_in_any_order():
    orders = set()
    for p in _problems("sum"):
        numbers = list(map(int, re.fullmatch(r"What is (\d+(?:\+\d+)+)\?", p.prompt).group(1).split("+")))
        assert len(numbers) == p.difficulty and all(10 <= n <= 99 for n in numbers)
        lines = [tuple(map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", line).groups())) for line in p.reasoning.split("\n")]
        assert len(lines) == len(numbers) - 1
        used = [lines[0][0]] + [y for _, y, _ in lines]
        assert sorted(used) == sorted(numbers)  # every term exactly once
        for (x, y, v), nxt in zip(lines, lines[1:] + [None]):
            assert v == x + y and (nxt is None or nxt[0] == v)
        assert p.answer == str(sum(numbers)) == str(lines[-1][2]) and verify(p, p.answer)
        assert p.key == "sum:" + "+".join(map(str, sorted(numbers)))  # the same problem in any order
        orders.add(tuple(used) == tuple(numbers))
    assert orders == {True, False}  # the working takes the terms in a random order, sometimes as given
    assert sum_problem([12, 30, 7], [2, 0, 1]).reasoning == "7+12=19\n19+30=49"
    with pytest.raises(ValueError, match="permutation"):
        sum_problem([12, 30], [0, 0])
    with pytest.raises(ValueError, match="at least two"):
        sum_problem([12])


def test_judge_checks_a_proposed_sum():
    verdicts = set()
    for p in _problems("judge"):
        question, proposed = re.fullmatch(r"Check the proposed answer to this problem\.\nProblem: (What is [\d+]+\?)\n"
                                          r"Proposed answer: (\d+)\n.*", p.prompt, re.S).groups()
        assert p.prompt == JUDGE_PROMPT.format(question=question, answer=proposed)  # what the self-judge asks
        numbers = [int(n) for n in question.removeprefix("What is ").removesuffix("?").split("+")]
        total, right = sum(numbers), int(proposed) == sum(numbers)
        *working, comparison = p.reasoning.split("\n")
        assert len(working) == len(numbers) - 1 and working[-1].endswith(f"={total}")
        assert comparison == f"{total} vs proposed {proposed}: {'same' if right else 'different'}"
        assert p.answer == f"Verdict: {'correct' if right else 'incorrect'}" and verify(p, p.answer)
        assert verify(p, f"verdict: {'Right' if right else 'wrong'}.")
        assert not verify(p, f"Verdict: {'incorrect' if right else 'correct'}") and not verify(p, proposed)
        assert split_of(p) == split_of(sum_problem(numbers))  # held out together with the sum it judges
        verdicts.add(right)
    assert verdicts == {True, False}


def test_modular_working():
    for p in _problems("modular"):
        m = re.fullmatch(r"What is \((\d+)([+\-*])(\d+)\) mod (\d+)\?|What is (\d+)\^(\d+) mod (\d+)\?", p.prompt)
        assert m, p.prompt
        if m.group(1):
            a, op, b, mod = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            truth = int(_exact(f"{a}{op}{b}")) % mod
        else:
            a, e, mod = int(m.group(5)), int(m.group(6)), int(m.group(7))
            truth = pow(a, e, mod)
        lines = p.reasoning.split("\n")
        for line in lines[:-1]:  # every working line is a chain of equal expressions
            values = {_exact(part) for part in line.split("=")}
            assert len(values) == 1, line
        assert lines[-1] == f"answer {truth}" and p.answer == str(truth) and verify(p, p.answer)
    assert modular_problem(3, "^", 4, 5).answer == "1"


def test_countdown_solutions():
    for p in _problems("countdown"):
        assert len(p.numbers) == p.difficulty and p.target is not None and 1 <= p.target <= 999
        assert _exact(p.answer) == p.target
        used = Counter(int(t) for t in re.findall(r"\d+", p.answer))
        assert not used - Counter(p.numbers)
        for line in p.reasoning.split("\n"):
            lhs, rhs = line.split("=")
            assert _exact(lhs) == int(rhs)
        assert verify(p, p.answer)


def test_countdown_verifier():
    p = countdown_problem([25, 3, 4, 7], 105)
    assert verify(p, p.answer)
    assert verify(p, "(25+3)*4-7") and verify(p, " 4*(25+3) - 7 ") and verify(p, "(25+3)*4-7 = 105")
    assert not verify(p, "(25+3)*4-6")  # 6 is not given
    assert not verify(p, "25*4+7-3-3+1")  # 3 used twice, 1 not given
    assert not verify(p, "(25+3)*4")  # wrong value
    assert not verify(p, "105") and not verify(p, "") and not verify(p, "(25+3)*4-7)")
    assert not verify(p, "__import__('os')") and not verify(p, "25/0+80")
    q = countdown_problem([6, 4, 2], 3)  # fractions are exact
    assert verify(q, "6/4*2") and verify(q, q.answer)
    with pytest.raises(ValueError):
        countdown_problem([1, 1], 50)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_split_hygiene_and_determinism(task):
    spec = TASKS[task]
    d = min(spec.max_difficulty, spec.min_difficulty + 2)
    train_keys, test_keys = set(), set()
    for seed in range(12):
        train = list(generate(task, d, "train", 200, seed=seed))
        test = list(generate(task, d, "test", 20, seed=seed))
        assert len(train) == 200 and len(test) == 20
        assert all(split_of(p) == "train" for p in train) and all(split_of(p) == "test" for p in test)
        train_keys |= {p.key for p in train}
        test_keys |= {p.key for p in test}
    assert not train_keys & test_keys
    assert list(generate(task, d, "train", 50, seed=3)) == list(generate(task, d, "train", 50, seed=3))
    assert list(generate(task, d, "train", 50, seed=3)) != list(generate(task, d, "train", 50, seed=4))
    evals = list(generate(task, d, "test", 20, seed=0, unique=True))
    assert len({p.key for p in evals}) == 20


def test_split_fraction_and_errors():
    ps = list(itertools.islice(generate("addition", 4, "train", None, seed=0, max_tries=10**6), 1))
    assert ps and split_of(ps[0]) == "train"
    rng = random.Random(0)
    frac = sum(split_of(TASKS["addition"].generator(rng, 5)) == "test" for _ in range(20000)) / 20000
    assert 0.04 < frac < 0.06
    with pytest.raises(ValueError):
        list(generate("addition", 1, "test", 1000, unique=True, max_tries=2000))  # too few 1-digit problems
    with pytest.raises(ValueError):
        next(generate("nope", 1, "train", 1))
    with pytest.raises(ValueError):
        next(generate("addition", 99, "train", 1))
