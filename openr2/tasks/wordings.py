"""How people ask: the wordings of a question, system prompts and earlier turns, each with a held-out split.

A problem of synthetic.py asks in one training wording (`What is 347+589?`). People write `347 + 589 = ?`,
`add 512 and 199`, `Compute 463 plus 278.`, after a system prompt, or as the third turn of a chat. This
module turns one problem into such chats:
- `reword` gives a problem of the binary tasks (addition, subtraction, multiplication) another wording: a
  *template* is a question frame (`What's {e}?`, `{e} = ?`, `My homework asks for {e}. What is it?`) with
  an expression form (`{a} plus {b}`, `the difference between {a} and {b}`), or a command (`Subtract {b}
  from {a}`) with a lead; then lower case or no end punctuation at random. The working (synthetic.py) always
  opens by restating the problem (`Problem: 512-199`), so the model learns to parse before it computes.
- templates (by their text without case and end punctuation, so `Add {a} and {b}.` and `add {a} and {b}!`
  are one template) and system prompts are split by a sha256 like problems are (~20% held out): training
  sees only train templates; `worded_chat(..., split="test")` asks in held-out ones only.
- `worded_chat` builds the whole conversation: an optional system prompt, earlier exchanges (their
  answers only, as the chat format keeps them) and the question whose reply is trained or graded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re

from openr2.tasks.synthetic import Problem, to_messages

TEMPLATE_TEST_FRACTION = 0.2

# Expression forms by operation; {a} {b} are the operands in the order the working restates them.
_EXPRESSIONS = {
    "+": ["{a}+{b}", "{a} + {b}", "{a} plus {b}", "the sum of {a} and {b}", "{a} added to {b}", "{a}+ {b}",
          "{a} and {b} added together", "{a} +{b}"],
    "-": ["{a}-{b}", "{a} - {b}", "{a} minus {b}", "the difference between {a} and {b}", "{b} subtracted from {a}",
          "{a} take away {b}", "{a} -{b}", "{a} less {b}"],
    "*": ["{a}*{b}", "{a} * {b}", "{a} times {b}", "{a} x {b}", "the product of {a} and {b}", "{a} multiplied by {b}",
          "{a}x{b}", "{a} × {b}"],
}
_FRAMES = [
    "What is {e}?", "What's {e}?", "How much is {e}?", "Compute {e}.", "Calculate {e}.", "Work out {e}.",
    "Find {e}.", "Evaluate {e}.", "{e} = ?", "{e}=?", "{e} =", "{e}?", "{e}", "Solve {e}.", "Tell me {e}.",
    "Can you compute {e}?", "Could you tell me what {e} is?", "Please calculate {e}.", "I need {e}.",
    "Quick question: what is {e}?", "Hey, what's {e}?", "What do you get for {e}?", "Help me with {e}.",
    "My homework asks for {e}. What is it?", "What does {e} equal?", "Do you know what {e} is?",
    "What is the result of {e}?", "Give me the answer to {e}.", "Result of {e}?", "I was wondering, what is {e}?",
]
_COMMANDS = {
    "+": ["add {a} and {b}", "add {b} to {a}", "sum {a} and {b}", "find the sum of {a} and {b}",
          "total {a} and {b}", "put {a} and {b} together"],
    "-": ["subtract {b} from {a}", "take {b} away from {a}", "take away {b} from {a}",
          "find the difference between {a} and {b}", "deduct {b} from {a}", "remove {b} from {a}"],
    "*": ["multiply {a} by {b}", "multiply {a} and {b}", "find the product of {a} and {b}", "times {a} by {b}"],
}
_LEADS = ["", "Please ", "Can you ", "Could you ", "Now ", "Quickly, "]
_ENDS = [".", "?", "!", "", " please."]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.", "You are openr2, a helpful assistant.", "Answer concisely.",
    "You are a math tutor. Be precise.", "You are a friendly assistant who answers questions.",
    "Think step by step.", "You are an AI assistant. Keep answers short.", "Be brief.",
    "You are a calculator.", "You help students with arithmetic.", "Respond in English.",
    "You are a careful assistant; double-check your work.", "You are ChatBot, a large language model.",
    "Reply with the answer only.", "You are a helpful, harmless and honest assistant.",
]

_CANONICAL = re.compile(r"^What is (\d+)([+\-*])(\d+)\?$")


def _core(template: str) -> str:
    """What a template is, whatever the case and end punctuation people type (the split hashes this)."""
    return re.sub(r"[.?!= ]+$", "", template).lower()


def _split(text: str) -> str:
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return "test" if h % 10_000 < TEMPLATE_TEST_FRACTION * 10_000 else "train"


def templates(op: str, split: str) -> list[str]:
    """The question templates of one operation (`+ - *`) in `split`, each with {a} and {b}. The training
    wording `What is {a}<op>{b}?` is always a train template."""
    canonical = "What is {a}" + op + "{b}?"
    out = [frame.replace("{e}", e) for frame in _FRAMES for e in _EXPRESSIONS[op]]
    out += [lead + command + end for lead in _LEADS for command in _COMMANDS[op] for end in _ENDS]
    out = [t for t in out if _split(_core(t)) == split and _core(t) != _core(canonical)]
    return [canonical] + out if split == "train" else out


def system_prompts(split: str) -> list[str]:
    return [s for s in SYSTEM_PROMPTS if _split("system:" + s) == split]


def _surface(text: str, rng: random.Random) -> str:
    """People's typing: sometimes all lower case, sometimes another (or no) end punctuation."""
    if rng.random() < 0.2:
        text = text.lower()
    if rng.random() < 0.2 and text[-1:] in ".?!":
        text = text[:-1] + rng.choice(_ENDS[:4])
    return text


def operands(problem: Problem) -> tuple[int, str, int] | None:
    """(a, op, b) of a binary problem asked in the training wording, else None (not rewordable)."""
    m = _CANONICAL.match(problem.prompt)
    return (int(m.group(1)), m.group(2), int(m.group(3))) if m else None


def reword(problem: Problem, rng: random.Random, split: str = "train") -> Problem:
    """The problem asked in a random template of `split` (the same problem, working and answer); problems
    that are not binary arithmetic are returned as they are."""
    parts = operands(problem)
    if parts is None:
        return problem
    a, op, b = parts
    template = rng.choice(templates(op, split))
    text = template.format(a=a, b=b)
    return dataclasses.replace(problem, prompt=_surface(text[0].upper() + text[1:], rng))


def worded_chat(problem: Problem, rng: random.Random, earlier: list[Problem] = (), split: str = "train",
                system: bool | None = None, reworded: bool | None = None) -> list[dict[str, str]]:
    """The chat that asks `problem` last and its reply `<think>\\nR\\n</think>\\n\\nA`: in a random wording
    (`reworded`, default: 80% of rewordable problems), after a system prompt (`system`, default 30%), after
    the `earlier` problems asked and answered (answers only: the chat format drops earlier reasoning)."""
    messages: list[dict[str, str]] = []
    if system if system is not None else rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(system_prompts(split))})
    for p in earlier:
        messages += [{"role": "user", "content": reword(p, rng, split).prompt},
                     {"role": "assistant", "content": p.answer}]
    if reworded if reworded is not None else rng.random() < 0.8:
        problem = reword(problem, rng, split)
    return messages + to_messages(problem)
