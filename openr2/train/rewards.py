"""Reward sources for GRPO: small functions that score a completion and say why.

Each source returns one `Reward(score, reason)` per completion of a group, so that group-level sources
(the majority vote) and per-sample ones share one signature:

    source(problem, completions: list[str]) -> list[Reward]

- `verifiable`: 1 if the answer after `</think>` is right (task verifier for synthetic problems, exact
  integer match, else math-verify equivalence); needs the ground truth.
- `format`: 1 if the completion is `reasoning\\n</think>\\n\\nanswer` with one non-empty answer line.
- `majority`: label-free (TTRL): the most common parsed answer of the group is the pseudo-label; a sample
  agreeing with it gets 1. No pseudo-label (and all zeros) when the top answers tie or nobody answered.
- `judge`: a generative judge (the policy itself, a frozen copy, or another checkpoint) grades each answer
  with a judging prompt; the verdicts of k judge samples are averaged (DeepSeek-GRM-style voting).
`combine` weights several sources into one scalar per completion and keeps each source's scores for logs.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from openr2.tasks.answers import answer_of
from openr2.tasks.synthetic import JUDGE_PROMPT, TASKS, Problem, parse_expression, verdict_of, verify
from openr2.tokenizer import THINK_END

_INT = re.compile(r"^[+-]?\d[\d,]*$")
_EXPR = re.compile(r"^[\d\s+\-*/()×÷]+(=\s*\d+)?$")


@dataclass(frozen=True)
class Reward:
    score: float
    reason: str


def answer_text(completion: str) -> str | None:
    """The answer after the reasoning, or None when `</think>` never came or nothing follows it."""
    return answer_of(completion) or None


def normalize_answer(answer: str) -> str:
    """Canonical form for voting: trimmed, a trailing period dropped, thousands commas out of integers, and an
    arithmetic expression replaced by its exact value and the numbers it uses (answers are compared by
    equivalence, as TTRL compares math answers: `3*5+7` and `7+3*5` are one vote, "22 from 3,5,7"). The
    numbers are part of the answer: in countdown every attempt aims at the target named in the prompt, so
    a vote by value alone would let `22` made from numbers that were never given outvote honest attempts,
    and the policy learns to cheat (measured: greedy 41.9% -> 27.9% on countdown:2)."""
    a = answer.strip().rstrip(".").strip()
    if _INT.match(a):
        a = a.replace(",", "").lstrip("+")
        return str(int(a))
    if _EXPR.match(a) and any(op in a for op in "+-*/"):
        try:
            value, used = parse_expression(a.split("=")[0])
        except (ValueError, ZeroDivisionError):
            pass
        else:
            return f"{value} from {','.join(map(str, sorted(used)))}"  # "22 from 3,5,7" or "7/2 from 2,7"
    return re.sub(r"\s+", " ", a)


def is_correct(problem: Problem, answer: str) -> bool:
    """Ground-truth check: the task's verifier (synthetic tasks, countdown expressions), else exact match
    of normalised answers, else math-verify equivalence (LaTeX, fractions; the eval harness's grader)."""
    if problem.task in TASKS:
        return verify(problem, answer)
    if normalize_answer(answer) == normalize_answer(problem.answer):
        return True
    try:
        from math_verify import parse
        from math_verify import verify as math_verify
    except ImportError:
        return False
    try:
        return bool(math_verify(parse(problem.answer), parse(answer)))
    except Exception:  # math-verify raises on unparsable input; that answer is simply not right
        return False


# ---------------------------------------------------------------------------------------------- sources

def verifiable(problem: Problem, completions: Sequence[str]) -> list[Reward]:
    out = []
    for c in completions:
        a = answer_text(c)
        if a is None:
            out.append(Reward(0.0, "no answer"))
        else:
            ok = is_correct(problem, a)
            out.append(Reward(float(ok), "correct" if ok else f"wrong: {a[:40]!r}"))
    return out


_FORMAT = re.compile(r"^(?!.*<think>).+?\n</think>\n\n[^\n]+$", re.DOTALL)


def format_reward(problem: Problem, completions: Sequence[str]) -> list[Reward]:
    """The R1 shape after a prompt that opened `<think>`: reasoning, `\\n</think>\\n\\n`, one answer line."""
    out = []
    for c in completions:
        ok = bool(_FORMAT.match(c)) and c.count(THINK_END) == 1
        out.append(Reward(float(ok), "format ok" if ok else "format broken"))
    return out


def majority_label(completions: Sequence[str], min_share: float = 0.0) -> str | None:
    """The group's most common normalised answer; None when nobody answered, the top answers tie, or the top
    answer has under `min_share` of the group's votes (a weak majority is more often wrong: pseudo-labels
    only from confident groups, as confidence-thresholded self-training does)."""
    votes = Counter(normalize_answer(a) for a in map(answer_text, completions) if a is not None)
    if not votes:
        return None
    (top, n), *rest = votes.most_common(2) + [(None, 0)]
    if (rest and rest[0][1] == n) or n < min_share * len(completions):
        return None
    return top


def majority(problem: Problem, completions: Sequence[str], min_share: float = 0.0) -> list[Reward]:
    """Label-free: agreement with the group's majority answer (the ground truth is never read)."""
    label = majority_label(completions, min_share)
    if label is None:
        return [Reward(0.0, "no majority") for _ in completions]
    out = []
    for c in completions:
        a = answer_text(c)
        agree = a is not None and normalize_answer(a) == label
        out.append(Reward(float(agree), f"agrees with {label!r}" if agree else f"disagrees with {label!r}"))
    return out


# ---------------------------------------------------------------------------------------------- self-judge

def parse_verdict(judge_output: str) -> float | None:
    """1.0 / 0.0 from the judge's last `Verdict: ...` line (after its reasoning), None when it gave none."""
    answer = answer_of(judge_output)
    verdict = verdict_of(judge_output if answer is None else answer)
    return None if verdict is None else float(verdict)


def make_judge(generate: Callable[[list[str], int], list[list[str]]], samples: int = 4
               ) -> Callable[[Problem, Sequence[str]], list[Reward]]:
    """A judge source. `generate(prompts, k)` returns k judge completions per user prompt (the caller
    decides which model judges and how it samples); the reward is the mean of the parsed verdicts (0 when
    none parses), so more judge samples give a finer, steadier score."""

    def judge(problem: Problem, completions: Sequence[str]) -> list[Reward]:
        answers = [answer_text(c) for c in completions]
        asked = [i for i, a in enumerate(answers) if a is not None]
        out = [Reward(0.0, "no answer to judge")] * len(completions)
        if not asked:
            return out
        outputs = generate([JUDGE_PROMPT.format(question=problem.prompt, answer=answers[i]) for i in asked], samples)
        for i, judged in zip(asked, outputs):
            verdicts = [v for v in map(parse_verdict, judged) if v is not None]
            score = sum(verdicts) / len(verdicts) if verdicts else 0.0
            out[i] = Reward(score, f"{len(verdicts)}/{len(judged)} verdicts, mean {score:.2f}")
        return out

    return judge


# ---------------------------------------------------------------------------------------------- combining

SOURCES: dict[str, Callable[[Problem, Sequence[str]], list[Reward]]] = {
    "verifiable": verifiable, "format": format_reward, "majority": majority,
}
LABEL_FREE = {"format", "majority", "judge"}


def parse_reward_spec(spec: str) -> dict[str, float]:
    """`majority:1,format:0.1` -> {"majority": 1.0, "format": 0.1}; names: verifiable, format, majority, judge."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, w = part.partition(":")
        if name not in (*SOURCES, "judge"):
            raise ValueError(f"rewards: unknown source {name!r}; expected verifiable, format, majority or judge")
        try:
            weights[name] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"rewards: {part!r}: the weight must be a number") from None
    if not weights or not any(w != 0 for w in weights.values()):
        raise ValueError(f"rewards: {spec!r}: give at least one source with a non-zero weight")
    return weights


def combine(problem: Problem, completions: Sequence[str], weights: dict[str, float],
            judge: Callable[[Problem, Sequence[str]], list[Reward]] | None = None, majority_min_share: float = 0.0
            ) -> tuple[list[float], dict[str, list[Reward]]]:
    """Weighted sum per completion, and each source's rewards (for logging)."""
    parts: dict[str, list[Reward]] = {}
    for name in weights:
        if name == "judge":
            if judge is None:
                raise ValueError("rewards: 'judge' needs a judge (make_judge)")
            parts[name] = judge(problem, completions)
        elif name == "majority":
            parts[name] = majority(problem, completions, majority_min_share)
        else:
            parts[name] = SOURCES[name](problem, completions)
    totals = [sum(weights[n] * parts[n][i].score for n in weights) for i in range(len(completions))]
    return totals, parts
