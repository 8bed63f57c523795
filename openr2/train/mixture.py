"""A weighted mixture of synthetic tasks as SFT examples: what `openr2 train --tasks ...` and the demo recipe
train on.

`parse_mixture("addition:1-5:3,countdown:2-3")` gives one `MixtureItem` per (task, difficulty) with a
weight (the weight of a range is shared by its difficulties, default 1). `mixture_examples` draws N
problems of the *train* split only (see tasks.synthetic.split_of), each item's share proportional to its weight,
deterministically for a seed, and encodes them as (ids, loss_mask) SFT examples, a share of them worded
as people ask (tasks/wordings.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from openr2.chat_format import encode_chat_for_training
from openr2.tasks.synthetic import TASKS, Problem, generate
from openr2.tasks.wordings import worded_chat
from openr2.train.data import sft_example

if TYPE_CHECKING:
    from openr2.tokenizer import Tokenizer


@dataclass(frozen=True)
class MixtureItem:
    task: str
    difficulty: int
    weight: float


def parse_mixture(spec: str) -> list[MixtureItem]:
    """`task[:lo[-hi]][:weight]` items separated by commas; no difficulty means the task's whole range."""
    items: list[MixtureItem] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        fields = part.split(":")
        task = fields[0]
        if task not in TASKS or len(fields) > 3:
            raise ValueError(f"tasks: {part!r}: expected task[:lo[-hi]][:weight] with task one of {sorted(TASKS)}")
        spec_ = TASKS[task]
        lo, hi = spec_.min_difficulty, spec_.max_difficulty
        weight = 1.0
        try:
            if len(fields) > 1 and fields[1]:
                lo_s, _, hi_s = fields[1].partition("-")
                lo, hi = int(lo_s), int(hi_s or lo_s)
            if len(fields) > 2:
                weight = float(fields[2])
        except ValueError:
            raise ValueError(f"tasks: {part!r}: difficulty must be N or LO-HI and weight a number") from None
        if not spec_.min_difficulty <= lo <= hi <= spec_.max_difficulty:
            raise ValueError(f"tasks: {part!r}: {spec_.knob} range {lo}-{hi} outside "
                             f"[{spec_.min_difficulty}, {spec_.max_difficulty}]")
        if not weight > 0:
            raise ValueError(f"tasks: {part!r}: weight must be positive")
        items += [MixtureItem(task, d, weight / (hi - lo + 1)) for d in range(lo, hi + 1)]
    if not items:
        raise ValueError("tasks: empty mixture")
    return items


def mixture_problems(items: list[MixtureItem], n: int | None, seed: int = 0) -> Iterator[Problem]:
    """n train-split problems (forever if n is None), interleaved at random in proportion to the weights;
    deterministic for the seed, and the first m of n are the same for every n >= m."""
    streams = [generate(it.task, it.difficulty, "train", None, seed=seed) for it in items]
    rng = random.Random(f"mixture:{seed}")
    weights = [it.weight for it in items]
    count = 0
    while n is None or count < n:
        yield next(streams[rng.choices(range(len(items)), weights=weights)[0]])
        count += 1


def mixture_examples(items: list[MixtureItem], n: int, tokenizer: Tokenizer, seed: int = 0,
                     chat_variety: float = 0.0) -> list[tuple[list[int], list[int]]]:
    """n SFT examples; a `chat_variety` share of them asked as people ask (wordings.worded_chat: train
    templates, system prompts, 0-2 earlier exchanges drawn from the same mixture), the rest in the
    training wording alone."""
    if chat_variety <= 0:
        return [sft_example(p, tokenizer) for p in mixture_problems(items, n, seed)]
    rng = random.Random(f"chat-variety:{seed}")
    earlier = mixture_problems(items, None, seed + 1)
    out = []
    for p in mixture_problems(items, n, seed):
        if rng.random() < chat_variety:
            turns = [next(earlier) for _ in range(rng.choices((0, 1, 2), weights=(55, 30, 15))[0])]
            out.append(encode_chat_for_training(worded_chat(p, rng, turns), tokenizer))
        else:
            out.append(sft_example(p, tokenizer))
    return out
