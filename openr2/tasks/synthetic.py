"""Synthetic reasoning tasks: seeded generators, their verifiers and the held-out split.

Owns the task generators (addition, subtraction, multiplication, sums of terms, countdown, modular
arithmetic, judging a proposed sum with the self-judge reward's prompt, small talk: anything else,
answered with what the model can do; and needle.py's passkey retrieval, registered here) with short, regular chains of
thought and a difficulty knob each, `verify` for a model's answer (countdown: any expression of the given
numbers that reaches the target), the train/test split (`split_of`, `held_out_problems`) and a problem
as the chat it is trained and asked with (`to_messages`). Training examples are train/data.py's job, other
wordings wordings.py's.

Held-out split: `split_of` hashes the canonical problem (task + operands, commutative operands sorted,
so 589+347 is the same problem as 347+589) with sha256; ~5% is "test". `generate` rejects problems of
the other split, so a test problem can never appear in a training stream.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

from openr2.tasks import needle as _needle

TEST_FRACTION = 0.05


@dataclass(frozen=True)
class Problem:
    """One problem: the user's question, the reasoning to write inside <think>, and the bare answer.

    `key` is the canonical problem; the split hashes `split_key` when set (a judging problem goes with the
    problem it judges), else `key`. `target` and `numbers` are set for countdown, whose answer is one of
    many valid expressions.
    """
    task: str
    difficulty: int
    prompt: str
    reasoning: str
    answer: str
    key: str
    numbers: tuple[int, ...] = ()
    target: int | None = None
    split_key: str | None = None


# ---------------------------------------------------------------------------------------------- builders

def _digits(n: int) -> int:
    return len(str(abs(n)))


def _operand(rng: random.Random, digits: int) -> int:
    """A number with exactly `digits` digits (0-9 for one digit)."""
    if digits < 1:
        raise ValueError(f"digits={digits}: must be at least 1")
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _pair(rng: random.Random, digits: int) -> tuple[int, int]:
    """One operand of `digits` digits, the other of 1..digits digits, in random order (mixed lengths)."""
    a, b = _operand(rng, digits), _operand(rng, rng.randint(1, digits))
    return (a, b) if rng.random() < 0.5 else (b, a)


def addition_problem(a: int, b: int) -> Problem:
    """`What is a+b?` worked column by column, right to left: `7+9+0=16, write 6 carry 1`."""
    if a < 0 or b < 0:
        raise ValueError(f"addition: operands must be non-negative, got {a}, {b}")
    lines, carry, n = [f"Problem: {a}+{b}"], 0, max(_digits(a), _digits(b))
    for i in range(n):
        x, y = a // 10 ** i % 10, b // 10 ** i % 10
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s}, write {s % 10} carry {s // 10}")
        carry = s // 10
    if carry:
        lines.append(f"write carry {carry}")
    lines.append(f"{a}+{b}={a + b}")
    return Problem("addition", n, f"What is {a}+{b}?", "\n".join(lines), str(a + b),
                   f"addition:{min(a, b)}+{max(a, b)}")


def subtraction_problem(a: int, b: int) -> Problem:
    """`What is a-b?` (a >= b) column by column, right to left: `2-9-0=-7, write 3 borrow 1` (a negative
    column difference d writes d+10 and borrows), so each line needs only its own column and the borrow."""
    if not 0 <= b <= a:
        raise ValueError(f"subtraction: need 0 <= b <= a, got {a}-{b}")
    lines, borrow, n = [f"Problem: {a}-{b}"], 0, _digits(a)
    for i in range(n):
        x, y = a // 10 ** i % 10, b // 10 ** i % 10
        d = x - y - borrow
        lines.append(f"{x}-{y}-{borrow}={d}, write {d % 10} borrow {int(d < 0)}")
        borrow = int(d < 0)
    lines.append(f"{a}-{b}={a - b}")
    return Problem("subtraction", n, f"What is {a}-{b}?", "\n".join(lines), str(a - b), f"subtraction:{a}-{b}")


def multiplication_problem(a: int, b: int) -> Problem:
    """`What is a*b?` as one partial product per digit of b (right to left), then their sum."""
    if a < 0 or b < 0:
        raise ValueError(f"multiplication: operands must be non-negative, got {a}, {b}")
    parts = [a * (b // 10 ** i % 10) * 10 ** i for i in range(_digits(b))]
    lines = [f"Problem: {a}*{b}"] + [f"{a}*{b // 10 ** i % 10 * 10 ** i}={p}" for i, p in enumerate(parts)]
    if len(parts) > 1:  # one partial product is already the whole product
        lines += [f"{'+'.join(map(str, parts))}={a * b}", f"{a}*{b}={a * b}"]
    return Problem("multiplication", max(_digits(a), _digits(b)), f"What is {a}*{b}?", "\n".join(lines),
                   str(a * b), f"multiplication:{min(a, b)}*{max(a, b)}")


def sum_problem(numbers: Sequence[int], order: Sequence[int] | None = None) -> Problem:
    """`What is 47+38+19?` as a running total, one addition per line, taking the terms in `order` (indices
    into numbers; default as given). Any order is a correct working: the generator picks one at random,
    so the task has many solution paths to one answer."""
    if len(numbers) < 2 or any(n < 0 for n in numbers):
        raise ValueError(f"sum: need at least two non-negative numbers, got {list(numbers)}")
    order = list(range(len(numbers))) if order is None else list(order)
    if sorted(order) != list(range(len(numbers))):
        raise ValueError(f"sum: order {order} is not a permutation of the {len(numbers)} terms")
    total, lines = numbers[order[0]], []
    for i in order[1:]:
        lines.append(f"{total}+{numbers[i]}={total + numbers[i]}")
        total += numbers[i]
    return Problem("sum", len(numbers), f"What is {'+'.join(map(str, numbers))}?", "\n".join(lines), str(total),
                   f"sum:{'+'.join(map(str, sorted(numbers)))}")


# The self-judge reward (rewards.make_judge) asks exactly this and reads the last `Verdict:` line.
JUDGE_PROMPT = ("Check the proposed answer to this problem.\nProblem: {question}\nProposed answer: {answer}\n"
                "Work it out, then end with exactly one line: 'Verdict: correct' or 'Verdict: incorrect'.")
VERDICT = re.compile(r"verdict\s*[:=]\s*\**\s*(correct|incorrect|right|wrong|yes|no)\b", re.IGNORECASE)


def verdict_of(text: str) -> bool | None:
    """True / False from the last `Verdict: ...` in text, None when there is none."""
    found = VERDICT.findall(text)
    return None if not found else found[-1].lower() in ("correct", "right", "yes")


def judge_problem(base: Problem, candidate: str) -> Problem:
    """Checking a proposed answer to `base`: work the problem out as `base` does, compare, give a verdict.
    Held out together with `base` (same split), so no judging problem leaks a test problem's working."""
    right = verify(base, candidate)
    comparison = f"{base.answer} vs proposed {candidate}: {'same' if right else 'different'}"
    return Problem("judge", base.difficulty, JUDGE_PROMPT.format(question=base.prompt, answer=candidate),
                   f"{base.reasoning}\n{comparison}", f"Verdict: {'correct' if right else 'incorrect'}",
                   f"judge:{base.key}:{candidate}", split_key=base.split_key or base.key)


# Anything that is not arithmetic gets one reply: what the model can do, with examples it answers.
SMALLTALK_ANSWER = ("Hi! I'm a small openr2 model trained to do arithmetic: addition, subtraction, multiplication, "
                    "remainders and countdown puzzles. Try \"What is 347+589?\" or \"Subtract 199 from 512\".")
_GREETINGS = ["", "Hello! ", "Hi, ", "Hey. ", "Good morning! ", "Hi there! ", "Greetings. ", "Hello again. ", "Yo, ",
              "Good evening. ", "Hey there, "]
_CHATTER = [
    "", "Who are you?", "What are you?", "What's your name?", "What can you do?", "How are you?",
    "Are you a robot?", "Can you help me?", "Tell me about yourself.", "What is the capital of France?",
    "Tell me a joke.", "Write a poem about the sea.", "What's the weather like today?",
    "Translate 'good night' into French.", "Who won the last world cup?", "Explain quantum physics simply.",
    "How do I bake bread?", "What is the meaning of life?", "Can you write Python code?",
    "Summarize the news for me.", "What time is it?", "Do you like music?", "Recommend a good book.",
    "Why is the sky blue?", "What's your favorite color?", "Help", "Thanks!", "Good night.",
    "How does a car engine work?", "What should I cook tonight?", "Are you better than ChatGPT?",
    "What languages do you speak?", "Who made you?", "Is it going to rain tomorrow?", "Sing me a song.",
]


def smalltalk(rng: random.Random, level: int = 1) -> Problem:
    """A message that is not an arithmetic question (a greeting and/or a question from outside arithmetic);
    the reply says what the model can do. Split by the message (any case, punctuation ignored)."""
    text = (rng.choice(_GREETINGS) + rng.choice(_CHATTER)).strip() or "Hello!"
    if rng.random() < 0.2:
        text = text.lower()
    key = "smalltalk:" + re.sub(r"[^a-z ]", "", text.lower()).strip()
    return Problem("smalltalk", level, text, "The message is not an arithmetic question.", SMALLTALK_ANSWER, key)


def _mod_line(x: int, m: int) -> str:
    return f"{x}={x // m}*{m}+{x % m}"


def modular_problem(a: int, op: str, b: int, m: int) -> Problem:
    """`What is (a+b) mod m?` / `(a*b) mod m` / `(a-b) mod m` / `a^b mod m`, one line per operation.

    Powers reduce the base first, then multiply and reduce once per exponent step (keep b small).
    """
    if m < 2 or a < 0 or b < 0:
        raise ValueError(f"modular: need m >= 2 and non-negative operands, got {a}{op}{b} mod {m}")
    if op in "+-*" and len(op) == 1:
        v = a + b if op == "+" else a - b if op == "-" else a * b
        lines = [f"{a}{op}{b}={v}", _mod_line(v, m)]  # floor division keeps this right for v < 0 too
        prompt = f"What is ({a}{op}{b}) mod {m}?"
        key = f"{min(a, b)}{op}{max(a, b)}" if op != "-" else f"{a}-{b}"
    elif op == "^":
        if b < 1:
            raise ValueError(f"modular: exponent must be at least 1, got {b}")
        r = a % m
        lines = [_mod_line(a, m)]
        acc = r
        for _ in range(b - 1):
            lines.append(f"{acc}*{r}={acc * r}={acc * r // m}*{m}+{acc * r % m}")
            acc = acc * r % m
        v = pow(a, b, m)
        assert acc == v
        prompt, key = f"What is {a}^{b} mod {m}?", f"{a}^{b}"
    else:
        raise ValueError(f"modular: unknown operation {op!r}; expected one of + - * ^")
    lines.append(f"answer {v % m}")
    return Problem("modular", max(_digits(a), _digits(b), _digits(m)), prompt, "\n".join(lines), str(v % m),
                   f"modular:{key}%{m}")


def countdown_problem(numbers: Sequence[int], target: int, steps: Sequence[tuple[int, str, int]] | None = None
                      ) -> Problem:
    """Reach `target` from `numbers` (each at most once) with + - * /; reasoning = one line per step.

    `steps` are (x, op, y) applied in order, each result usable by later steps; without them a solver
    finds some. Raises ValueError when the target is unreachable.
    """
    numbers = tuple(int(n) for n in numbers)
    if steps is None:
        steps = _solve_countdown(list(numbers), target)
        if steps is None:
            raise ValueError(f"countdown: {target} cannot be made from {list(numbers)}")
    exprs: dict[int, list[str]] = {}  # value -> expressions available for it (a multiset of values)
    for n in numbers:
        exprs.setdefault(n, []).append(str(n))
    lines, last = [], None
    if not steps and target in numbers:
        lines, last = [f"{target} is given"], str(target)
    for x, op, y in steps:
        ex, ey = exprs[x].pop(), exprs[y].pop()
        v = _apply(x, op, y)
        assert v is not None and v == int(v)
        v = int(v)
        exprs.setdefault(v, []).append(f"({ex}{op}{ey})")
        lines.append(f"{x}{op}{y}={v}")
        last = exprs[v][-1]
    if last is None or parse_expression(last)[0] != target:
        raise ValueError(f"countdown: steps {list(steps)} do not reach {target}")
    answer = last[1:-1] if last.startswith("(") else last  # drop the outer parentheses only
    nums = ", ".join(map(str, numbers))
    prompt = f"Using the numbers {nums}, make {target}. Use + - * / and each number at most once."
    return Problem("countdown", len(numbers), prompt, "\n".join(lines), answer,
                   f"countdown:{','.join(map(str, sorted(numbers)))}={target}", numbers, target)


def _apply(x: int | Fraction, op: str, y: int | Fraction) -> Fraction | None:
    """x op y exactly; None for a division by zero."""
    x = Fraction(x)
    return {"+": x + y, "-": x - y, "*": x * y}[op] if op != "/" else (None if y == 0 else x / y)


def _solve_countdown(values: list[int], target: int, depth: int = 0) -> list[tuple[int, str, int]] | None:
    """Depth-first search over pairs with non-negative integer intermediates; fine for <= 5 numbers."""
    if depth == 0 and target in values:
        return []
    for i in range(len(values)):
        for j in range(len(values)):
            if i == j:
                continue
            x, y = values[i], values[j]
            for op in "+-*/":
                if op in "+*" and i > j:
                    continue
                v = _apply(x, op, y)
                if v is None or v < 0 or v.denominator != 1:
                    continue
                rest = [values[k] for k in range(len(values)) if k not in (i, j)] + [int(v)]
                if int(v) == target:
                    return [(x, op, y)]
                if len(rest) > 1:
                    found = _solve_countdown(rest, target, depth + 1)
                    if found is not None:
                        return [(x, op, y)] + found
    return None


# ---------------------------------------------------------------------------------------------- generators

def addition(rng: random.Random, digits: int) -> Problem:
    return addition_problem(*_pair(rng, digits))


def subtraction(rng: random.Random, digits: int) -> Problem:
    a, b = _pair(rng, digits)
    return subtraction_problem(max(a, b), min(a, b))


def multiplication(rng: random.Random, digits: int) -> Problem:
    return multiplication_problem(*_pair(rng, digits))


def _terms(rng: random.Random, terms: int) -> tuple[list[int], list[int]]:
    """`terms` two-digit numbers and a random order to add them in."""
    numbers = [rng.randint(10, 99) for _ in range(terms)]
    order = list(range(terms))
    rng.shuffle(order)
    return numbers, order


def sum_of_terms(rng: random.Random, terms: int) -> Problem:
    """`terms` two-digit numbers, added in a random order."""
    return sum_problem(*_terms(rng, terms))


def judge_of_sum(rng: random.Random, terms: int) -> Problem:
    """Judge a proposed total of a `sum` problem: right half the time, else a typical slip (a term left
    out, a carry dropped or doubled, a units digit off)."""
    numbers, order = _terms(rng, terms)
    base = sum_problem(numbers, order)
    total = int(base.answer)
    if rng.random() < 0.5:
        return judge_problem(base, base.answer)
    slips = [total - rng.choice(numbers), total + rng.choice((-20, -10, 10, 20)), total + rng.choice((-3, -2, -1, 1, 2, 3))]
    return judge_problem(base, str(rng.choice([w for w in slips if w > 0 and w != total])))


def modular(rng: random.Random, digits: int) -> Problem:
    """(a op b) mod m with a, b of up to `digits` digits, or a^e mod m with e in 2..5; m has `digits` digits."""
    m = max(2, _operand(rng, digits))
    op = rng.choice("+-*^")
    if op == "^":
        return modular_problem(_operand(rng, digits), "^", rng.randint(2, 5), m)
    a, b = _pair(rng, digits)
    if op == "-":
        a, b = max(a, b), min(a, b)
    return modular_problem(a, op, b, m)


def countdown(rng: random.Random, num_operands: int) -> Problem:
    """`num_operands` numbers in 1..25 combined in random order with random operations (integer, >= 0)."""
    if num_operands < 2:
        raise ValueError(f"countdown: num_operands={num_operands}: must be at least 2")
    while True:
        numbers = [rng.randint(1, 25) for _ in range(num_operands)]
        pool, steps = list(numbers), []
        rng.shuffle(pool)
        acc = pool[0]
        for y in pool[1:]:
            ops = ["+", "*"] + (["-"] if acc > y else []) + (["/"] if y > 1 and acc % y == 0 else [])
            op = rng.choice(ops)
            x, yy = (acc, y) if op in "-/" or rng.random() < 0.5 else (y, acc)
            steps.append((x, op, yy))
            acc = int(_apply(x, op, yy))
        if 1 <= acc <= 999:
            return countdown_problem(numbers, acc, steps)


@dataclass(frozen=True)
class TaskSpec:
    generator: Callable[[random.Random, int], Problem]
    min_difficulty: int
    max_difficulty: int
    knob: str


TASKS: dict[str, TaskSpec] = {
    "addition": TaskSpec(addition, 1, 10, "digits"),
    "subtraction": TaskSpec(subtraction, 1, 10, "digits"),
    "multiplication": TaskSpec(multiplication, 1, 5, "digits"),
    "countdown": TaskSpec(countdown, 2, 5, "num_operands"),
    "modular": TaskSpec(modular, 1, 4, "digits"),
    "sum": TaskSpec(sum_of_terms, 3, 8, "terms"),
    "judge": TaskSpec(judge_of_sum, 3, 8, "terms"),
    "smalltalk": TaskSpec(smalltalk, 1, 1, "level"),
    # passkey retrieval in filler of any length (needle.py): long contexts for sparse attention
    "needle": TaskSpec(_needle.needle, _needle.MIN_LENGTH, _needle.MAX_LENGTH, "length"),
}


def split_of(problem: Problem) -> str:
    """"train" or "test" from a sha256 of the canonical problem; stable across runs and machines."""
    h = int.from_bytes(hashlib.sha256((problem.split_key or problem.key).encode()).digest()[:8], "big")
    return "test" if h % 10_000 < TEST_FRACTION * 10_000 else "train"


def generate(task: str, difficulty: int, split: str, n: int | None, seed: int = 0, unique: bool = False,
             max_tries: int = 100_000) -> Iterator[Problem]:
    """Yield n problems (forever if n is None) of `split` only, deterministic for (task, difficulty, seed).

    Problems of the other split are rejected. `unique` skips repeats (for eval sets). Raises ValueError
    when `max_tries` draws in a row yield nothing usable (e.g. a test split of 1-digit addition).
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r}: unknown; expected one of {sorted(TASKS)}")
    spec = TASKS[task]
    if not spec.min_difficulty <= difficulty <= spec.max_difficulty:
        raise ValueError(f"{task}: {spec.knob}={difficulty} outside [{spec.min_difficulty}, {spec.max_difficulty}]")
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r}: expected 'train' or 'test'")
    rng = random.Random(f"{task}:{difficulty}:{seed}")  # str seeds are hashed with sha512: stable
    seen: set[str] = set()
    count = misses = 0
    while n is None or count < n:
        p = spec.generator(rng, difficulty)
        if split_of(p) != split or (unique and p.key in seen):
            misses += 1
            if misses >= max_tries:
                raise ValueError(f"{task} {spec.knob}={difficulty}: no new {split} problem in {max_tries} draws")
            continue
        misses = 0
        if unique:
            seen.add(p.key)
        count += 1
        yield p


def held_out_problems(task: str, difficulty: int, n: int, seed: int = 0) -> list[Problem]:
    """Up to n distinct test-split problems (fewer when the task has fewer, e.g. 1-digit addition)."""
    out: list[Problem] = []
    try:
        for p in generate(task, difficulty, "test", n, seed=seed, unique=True, max_tries=20_000):
            out.append(p)
    except ValueError:  # the test split ran out of new problems
        pass
    return out


def to_messages(problem: Problem, system: str | None = None) -> list[dict[str, str]]:
    """The problem as a chat: the user's question and an R1 reply `<think>\\nR\\n</think>\\n\\nA`."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": problem.prompt},
                   {"role": "assistant", "content": f"<think>\n{problem.reasoning}\n</think>\n\n{problem.answer}"}]


# ---------------------------------------------------------------------------------------------- verifying

_INT = re.compile(r"^[+-]?\d+$")


def verify(problem: Problem, answer_text: str) -> bool:
    """Is answer_text (the text after </think>) a correct answer? Integers compare exactly (commas and a
    trailing period ignored); countdown answers must evaluate to the target using each given number at
    most once (an optional trailing `=target` is allowed); judging answers must give the right verdict."""
    text = answer_text.strip()
    if problem.task == "smalltalk":
        return text == problem.answer
    if problem.task == "judge":
        verdict = verdict_of(text)
        return verdict is not None and verdict == verdict_of(problem.answer)
    if problem.target is not None:
        text = text.split("=")[0].strip() if text.count("=") == 1 else text
        try:
            value, used = parse_expression(text)
        except ValueError:
            return False
        available = list(problem.numbers)
        for u in used:
            if u not in available:
                return False
            available.remove(u)
        return value == problem.target
    text = text.replace(",", "").rstrip(".")
    return bool(_INT.match(text)) and bool(_INT.match(problem.answer.replace(",", ""))) and \
        int(text) == int(problem.answer.replace(",", ""))


_TOKEN = re.compile(r"\s*(\d+|[-+*/()])")


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """Parse + - * / ( ) over non-negative integers, exactly (Fractions), without eval: a recursive descent
    over expr := term (('+'|'-') term)*, term := atom (('*'|'/') atom)*, atom := int | '(' expr ')'.
    Returns (value, numbers used); raises ValueError on anything else."""
    text, tokens, pos = text.replace("×", "*").replace("÷", "/").rstrip(), [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"unexpected character at {pos}: {text[pos:pos + 5]!r}")
        tokens.append(m.group(1))
        pos = m.end()
    if not tokens or len(tokens) > 200:
        raise ValueError("empty or too long expression")
    tokens.append("")  # end marker
    used: list[int] = []
    i = 0

    def take(*expected: str) -> str:
        nonlocal i
        t = tokens[i]
        if expected and t not in expected:
            raise ValueError(f"expected one of {expected}, got {t!r}")
        i += t != ""
        return t

    def atom() -> Fraction:
        t = take()
        if t.isdigit():
            used.append(int(t))
            return Fraction(int(t))
        if t != "(":
            raise ValueError(f"unexpected {t!r}")
        v = expr()
        take(")")
        return v

    def binary(operand: Callable[[], Fraction], ops: str) -> Fraction:
        v = operand()
        while tokens[i] and tokens[i] in ops:
            op, r = take(), operand()
            w = _apply(v, op, r)
            if w is None:
                raise ValueError("division by zero")
            v = w
        return v

    def term() -> Fraction:
        return binary(atom, "*/")

    def expr() -> Fraction:
        return binary(term, "+-")

    value = expr()
    take("")
    return value, used
