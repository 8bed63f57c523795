"""Answer extraction and grading: the model's final answer text -> (extracted answer, correct).

Owns where an answer is found in a reply and how it is compared with the gold answer. It only ever sees
the answer part of a reply: the backends split reasoning (`<think>...</think>` or `reasoning_content`)
off first, so a number inside the reasoning can never be graded.

Extraction, first that applies: the last `\\boxed{...}` / `\\fbox{...}` (nested braces), "the answer is X",
"Answer: X", then (math) the last number or (choice) a lone letter such as `(B)`, `B.`, `B) text`.
Grading: math-verify for math (`\\frac{1}{2}` = 0.5, `1,000` = 1000, units and `\\$` dropped); exact
match for integers (AIME: `033` = 33) and letters; synthetic tasks use openr2.tasks.synthetic.verify.
"""

from __future__ import annotations

import re
import threading

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r".*answer\s+is\s*:?\s*(.+)", re.IGNORECASE)  # .* : the line's last one
_ANSWER_COLON = re.compile(r"^\s*\**\s*(?:final\s+)?answer\s*\**\s*:\s*\**\s*(.+)", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_NUMBER_WITH_WORDS = re.compile(r"^\s*(?:\\?\$\s*)?(-?[\d,]*\.?\d+)\s*(?:[A-Za-z%][A-Za-z% .]*)?\.?\s*$")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_LETTER = re.compile(r"^\s*[(\[]?\s*([A-J])\s*[)\].:]?(?:\s|$)")  # "B", "(B)", "B." or "B because"
_LONE_LETTER = re.compile(r"^\s*[(\[]?\s*([A-J])\s*(?:[)\].:]|$)")  # not "A common mistake..."
_LETTER_PAREN = re.compile(r"\(([A-J])\)")


def boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` / `\\fbox{...}`, braces balanced; an unclosed one is skipped."""
    out = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end():i - 1])
    return out


def _phrase(text: str) -> str | None:
    """The answer after the last "the answer is" / "Answer:", up to the end of its line, no final period."""
    hits = [m for pattern in (_ANSWER_IS, _ANSWER_COLON) for m in pattern.finditer(text)]
    if not hits:
        return None
    tail = max(hits, key=lambda m: m.start(1)).group(1).strip()
    tail = tail.strip("*").strip()
    if tail.startswith("$") and tail.count("$") >= 2:  # "$\frac{1}{2}$." -> "\frac{1}{2}"
        tail = tail[1:tail.index("$", 1)]
    return tail.rstrip(". ").strip() or None


def extract_math(text: str) -> str | None:
    """The final answer of a math reply, as text (LaTeX kept), or None."""
    boxed = boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    phrase = _phrase(text)
    if phrase is not None:
        return phrase
    numbers = _NUMBER.findall(text)
    return numbers[-1].rstrip(".") if numbers else None


def _untext(s: str) -> str:
    """`\\text{(B)}` -> `(B)`: unwrap text macros (repeatedly, for nesting) and drop `$` signs."""
    prev = None
    while prev != s:
        prev, s = s, _TEXT.sub(r"\1", s)
    return s.replace("$", "").strip()


def extract_choice(text: str, num_choices: int = 4) -> str | None:
    """The chosen letter (A, B, ...) of a multiple-choice reply, or None."""
    valid = "ABCDEFGHIJ"[:num_choices]
    text = text.replace("**", "")  # markdown bold: "**B**", "**Answer:** C"
    candidates = [_untext(b) for b in reversed(boxed_contents(text))]
    phrase = _phrase(text)
    if phrase is not None:
        candidates.append(_untext(phrase))
    for cand in candidates:
        m = _LETTER.match(cand)
        if m and m.group(1) in valid:
            return m.group(1)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for cand in [text, *lines[-1:]]:
        m = _LONE_LETTER.match(_untext(cand))
        if m and m.group(1) in valid:
            return m.group(1)
    parens = [m for m in _LETTER_PAREN.findall(_untext(text)) if m in valid]
    return parens[-1] if parens else None


def extract_integer(text: str) -> int | None:
    """The final integer of a reply (AIME): from the extracted math answer, commas and leading zeros ignored."""
    answer = extract_math(text)
    if answer is None:
        return None
    numbers = _NUMBER.findall(_untext(answer).replace("\\,", "").replace("{,}", ""))
    if not numbers:
        return None
    number = numbers[-1].replace(",", "").rstrip(".")
    try:
        value = float(number)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _simplify(answer: str) -> str:
    """Plain-text units after a number ("18 dollars", "$5") leave just the number; LaTeX is left to math-verify."""
    m = _NUMBER_WITH_WORDS.match(answer)
    return m.group(1) if m else answer


def _math_verify_parse(text: str):
    from math_verify import parse

    # math-verify times out with signal.alarm, which only the main thread may use
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    parsed = parse(f"${text}$", parsing_timeout=timeout)
    return parsed or parse(text, parsing_timeout=timeout)


def math_equal(gold: str, answer: str) -> bool:
    """Do two math answers mean the same? math-verify on both (gold first, as it expects)."""
    from math_verify import verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    answer = _simplify(answer)
    if answer.strip() == gold.strip():
        return True
    try:
        return bool(verify(_math_verify_parse(gold), _math_verify_parse(answer), timeout_seconds=timeout))
    except Exception:  # a parser blow-up on odd model text is a wrong answer, not a crashed run
        return False


def grade(item, content: str) -> tuple[str | None, bool]:
    """(extracted answer, correct) of one reply's answer text for an eval item (tasks.Item)."""
    if item.kind == "choice":
        letter = extract_choice(content, len(item.choices))
        return letter, letter == item.gold
    if item.kind == "integer":
        value = extract_integer(content)
        return (None, False) if value is None else (str(value), value == int(item.gold))
    if item.kind == "synthetic":
        from openr2.tasks.synthetic import verify

        boxed = boxed_contents(content)
        answer = boxed[-1].strip() if boxed else content.strip()
        return (answer or None), bool(answer) and verify(item.problem, answer)
    answer = extract_math(content)
    return answer, answer is not None and math_equal(item.gold, answer)
