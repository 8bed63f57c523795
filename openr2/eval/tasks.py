"""Evaluation tasks: reading a benchmark file (or the synthetic generators) into prompt items.

Owns the task names (`gsm8k`, `math500`, `arc`, `aime`, `gpqa`, `synthetic:NAME[:DIFFICULTY]`,
`needle:LENGTH[:DEPTH]`), the
record formats they read, the prompt each item is asked with (DeepSeek-R1's instruction style) and the
gold answer it is graded against. It does not grade (grading.py) nor run anything (backends.py).

Formats (JSONL, one object per line; an error names the file and line):
  gsm8k    {"question", "answer": "...\\n#### 72"}        gold: after `####`, commas removed
  math500  {"problem", "answer", "unique_id"?}            gold: the LaTeX answer
  aime     {"id", "problem", "answer": int}               gold: the integer
  arc      {"question", "choices": [...], "answer_index", "id"?}   choices in the file's order
  gpqa     {"question", "choices": [4 strings], "answer_index", "id"?}   choices shuffled per question
Synthetic tasks draw held-out (test split) problems from openr2.tasks.synthetic, as training-time eval does;
`needle:LENGTH` too (passkey retrieval in LENGTH characters of filler, openr2.tasks.needle, the needle at a
random depth), and `needle:LENGTH:DEPTH` puts every needle DEPTH percent of the way in.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = "Answer with the letter of the correct choice."
LETTERS = "ABCDEFGHIJ"

# Where the bundled benchmarks are looked for when no --data is given, and their file names.
DEFAULT_FILES = {"gsm8k": "gsm8k_test.jsonl", "math500": "math500_test.jsonl", "arc": "arc_challenge_test.jsonl"}
NEEDS_DATA = ("aime", "gpqa")  # a user's own file: no public copy ships with us
TASK_NAMES = ("gsm8k", "math500", "arc", "aime", "gpqa", "synthetic:NAME[:DIFFICULTY]", "needle:LENGTH[:DEPTH]")
SYNTHETIC_DEFAULT_ITEMS = 100


@dataclass
class Item:
    """One question: its stable id, the chat to send, the gold answer and how to grade it.

    kind: "math" (math-verify), "integer" (exact integer), "choice" (letter; `choices` are the options
    in the order shown) or "synthetic" (openr2.tasks.synthetic.verify on `problem`).
    """

    id: str
    messages: list[dict]
    gold: str
    kind: str
    choices: list[str] = field(default_factory=list)
    problem: object = None  # a tasks.synthetic.Problem for synthetic items

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


def math_prompt(problem: str) -> list[dict]:
    return [{"role": "user", "content": f"{problem.strip()}\n{MATH_INSTRUCTION}"}]


def choice_prompt(question: str, choices: list[str]) -> list[dict]:
    options = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return [{"role": "user", "content": f"{question.strip()}\n\n{options}\n\n{CHOICE_INSTRUCTION}"}]


def records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object names file:line."""
    from openr2.tasks.jsonl import jsonl_records

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    for lineno, record in jsonl_records(path):
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def _field(record: dict, name: str, kind, where: str):
    if name not in record:
        raise ValueError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: field {name!r} must be {expected}, got {value!r:.60}")
    return value


def _item_id(record: dict, key: str, fallback: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        return fallback
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f"{where}: field {key!r} must be a string or integer")
    return str(value)


def _gsm8k(lineno: int, rec: dict, index: int, where: str) -> Item:
    question, answer = _field(rec, "question", str, where), _field(rec, "answer", str, where)
    if "####" not in answer:
        raise ValueError(f"{where}: field 'answer' has no '####' before the final answer")
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return Item(f"gsm8k-{index}", math_prompt(question), gold, "math")


def _math500(lineno: int, rec: dict, index: int, where: str) -> Item:
    problem, answer = _field(rec, "problem", str, where), _field(rec, "answer", str, where)
    return Item(_item_id(rec, "unique_id", f"math500-{index}", where), math_prompt(problem), answer.strip(), "math")


def _aime(lineno: int, rec: dict, index: int, where: str) -> Item:
    problem, answer = _field(rec, "problem", str, where), _field(rec, "answer", (int, str), where)
    if isinstance(answer, str):
        if not answer.strip().lstrip("-").isdigit():
            raise ValueError(f"{where}: field 'answer' must be an integer, got {answer!r}")
        answer = int(answer)
    if "id" not in rec:
        raise ValueError(f"{where}: missing field 'id'")
    return Item(_item_id(rec, "id", "", where), math_prompt(problem), str(answer), "integer")


def _choices(rec: dict, where: str, num: int | None = None) -> tuple[list[str], int]:
    choices = _field(rec, "choices", list, where)
    if not all(isinstance(c, str) for c in choices) or not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"{where}: field 'choices' must be 2..{len(LETTERS)} strings")
    if num is not None and len(choices) != num:
        raise ValueError(f"{where}: field 'choices' must have {num} entries, got {len(choices)}")
    answer = _field(rec, "answer_index", int, where)
    if not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer_index {answer} is outside 0..{len(choices) - 1}")
    return list(choices), answer


def _arc(lineno: int, rec: dict, index: int, where: str) -> Item:
    question = _field(rec, "question", str, where)
    choices, answer = _choices(rec, where)
    return Item(_item_id(rec, "id", f"arc-{index}", where), choice_prompt(question, choices), LETTERS[answer],
                "choice", choices)


def shuffled_choices(item_id: str, choices: list[str], answer: int, seed: int) -> tuple[list[str], int]:
    """A per-question seeded order (the same for every run with this seed) and the answer's new index."""
    order = list(range(len(choices)))
    random.Random(f"gpqa:{item_id}:{seed}").shuffle(order)  # str seeds hash with sha512: stable everywhere
    return [choices[i] for i in order], order.index(answer)


def _gpqa(lineno: int, rec: dict, index: int, where: str, seed: int = 0) -> Item:
    question = _field(rec, "question", str, where)
    choices, answer = _choices(rec, where, num=4)
    item_id = _item_id(rec, "id", f"gpqa-{index}", where)
    choices, answer = shuffled_choices(item_id, choices, answer, seed)
    return Item(item_id, choice_prompt(question, choices), LETTERS[answer], "choice", choices)


_READERS = {"gsm8k": _gsm8k, "math500": _math500, "aime": _aime, "arc": _arc, "gpqa": _gpqa}


def default_data_dirs() -> list[str]:
    """$OPENR2_EVAL_DATA, ./data, then the shared checkout's data folder next to the repository."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dirs = [os.environ.get("OPENR2_EVAL_DATA"), "data", os.path.join(here, "..", "shared", "data")]
    return [os.path.normpath(d) for d in dirs if d]


def resolve_data(task: str, data: str | None) -> str | None:
    """The file a task reads: --data if given, else its bundled file from the default folders."""
    check_task(task)
    if data is not None or task.startswith(("synthetic:", "needle:")):
        return data
    if task in NEEDS_DATA:
        raise ValueError(f"task {task!r} reads your own file: pass --data FILE.jsonl (format in the README)")
    name = DEFAULT_FILES[task]
    for d in default_data_dirs():
        if os.path.isfile(os.path.join(d, name)):
            return os.path.join(d, name)
    raise FileNotFoundError(f"task {task!r}: {name} not found in {', '.join(default_data_dirs())}; pass --data FILE")


def parse_synthetic(task: str) -> tuple[str, int]:
    """`synthetic:addition` or `synthetic:addition:4` -> (name, difficulty); default difficulty 3 (clamped)."""
    from openr2.tasks.synthetic import TASKS

    parts = task.split(":")
    if len(parts) not in (2, 3) or parts[1] not in TASKS:
        raise ValueError(f"task {task!r}: expected synthetic:NAME[:DIFFICULTY] with NAME one of {sorted(TASKS)}")
    spec = TASKS[parts[1]]
    if len(parts) == 3:
        if not parts[2].isdigit():
            raise ValueError(f"task {task!r}: difficulty must be an integer")
        difficulty = int(parts[2])
        if not spec.min_difficulty <= difficulty <= spec.max_difficulty:
            raise ValueError(f"task {task!r}: {spec.knob}={difficulty} outside "
                             f"[{spec.min_difficulty}, {spec.max_difficulty}]")
    else:
        difficulty = min(max(3, spec.min_difficulty), spec.max_difficulty)
    return parts[1], difficulty


def parse_needle(task: str) -> tuple[int, int | None]:
    """`needle:LENGTH` or `needle:LENGTH:DEPTH` -> (length in characters, depth in percent or None: random)."""
    from openr2.tasks.needle import MAX_LENGTH, MIN_LENGTH

    parts = task.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"task {task!r}: expected needle:LENGTH[:DEPTH] (integers: characters, percent)")
    length, depth = int(parts[1]), int(parts[2]) if len(parts) == 3 else None
    if not MIN_LENGTH <= length <= MAX_LENGTH:
        raise ValueError(f"task {task!r}: LENGTH={length} outside [{MIN_LENGTH}, {MAX_LENGTH}]")
    if depth is not None and not 0 <= depth <= 100:
        raise ValueError(f"task {task!r}: DEPTH={depth} outside [0, 100] (percent)")
    return length, depth


def check_task(task: str) -> None:
    if task.startswith("synthetic:"):
        parse_synthetic(task)
    elif task.startswith("needle:"):
        parse_needle(task)
    elif task not in _READERS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_NAMES)}")


def synthetic_items(task: str, limit: int | None, seed: int) -> list[Item]:
    from openr2.tasks.synthetic import held_out_problems, to_messages

    name, difficulty = parse_synthetic(task)
    problems = held_out_problems(name, difficulty, limit or SYNTHETIC_DEFAULT_ITEMS, seed)
    # the prompt the model was trained on (no instruction): a score here is what training-time eval reports
    return [Item(f"{p.key}", to_messages(p)[:-1], p.answer, "synthetic", problem=p) for p in problems]


def needle_items(task: str, limit: int | None, seed: int) -> list[Item]:
    """Held-out (test split) needle problems, distinct, deterministic for (task, seed)."""
    from openr2.tasks.needle import needle
    from openr2.tasks.synthetic import split_of, to_messages

    length, depth = parse_needle(task)
    rng = random.Random(f"{task}:{seed}")  # str seeds hash with sha512: stable everywhere
    items: list[Item] = []
    seen: set[str] = set()
    while len(items) < (limit or SYNTHETIC_DEFAULT_ITEMS):
        p = needle(rng, length, depth)
        if split_of(p) == "test" and p.key not in seen:
            seen.add(p.key)
            items.append(Item(p.key, to_messages(p)[:-1], p.answer, "synthetic", problem=p))
    return items


def load_items(task: str, data: str | None = None, limit: int | None = None, seed: int = 0) -> list[Item]:
    """The task's items, in file order, at most `limit`; ids are unique (a repeated id is an error)."""
    check_task(task)
    if task.startswith("synthetic:"):
        return synthetic_items(task, limit, seed)
    if task.startswith("needle:"):
        return needle_items(task, limit, seed)
    path = resolve_data(task, data)
    read = _READERS[task]
    items: list[Item] = []
    seen: dict[str, int] = {}
    for lineno, rec in records(path):
        if limit is not None and len(items) >= limit:
            break
        where = f"{path}:{lineno}"
        item = read(lineno, rec, len(items), where, seed) if task == "gpqa" else read(lineno, rec, len(items), where)
        if item.id in seen:
            raise ValueError(f"{where}: id {item.id!r} repeats line {seen[item.id]}")
        seen[item.id] = lineno
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no records")
    return items
