"""Evaluation during and after training: held-out SFT loss, and task accuracy by greedy generation through
the engine (the same path that serves the model, so a score here is what users get).

Problems come from the test split only (tasks.synthetic.held_out_problems), drawn fresh and without
repeats for a seed, and are asked in the training wording or, to measure how the model takes other
wordings, in held-out templates, after held-out system prompts or as a second turn (tasks/wordings.py);
an answer is the text after `</think>` (tasks.answers.answer_of: a reply whose reasoning never closes has
no answer and is wrong), checked with tasks.synthetic.verify.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from openr2.tasks.answers import answer_of
from openr2.tasks.synthetic import Problem, held_out_problems, to_messages, verify
from openr2.tasks.wordings import worded_chat
from openr2.train.data import IGNORE_INDEX


@dataclass
class TaskResult:
    task: str
    difficulty: int
    correct: int = 0
    total: int = 0
    rows: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


# How a held-out problem is asked (tasks/wordings.py): in the training wording, or in a held-out template alone,
# after a held-out system prompt, or as the second turn after another held-out exchange.
SETTINGS = ("canonical", "worded", "system", "turn2")


def _ask(problem: Problem, setting: str, rng: random.Random, earlier: Problem) -> list[dict[str, str]]:
    if setting == "canonical":
        return to_messages(problem)[:-1]
    if setting not in SETTINGS:
        raise ValueError(f"setting {setting!r}: expected one of {SETTINGS}")
    return worded_chat(problem, rng, [earlier] if setting == "turn2" else [], split="test",
                       system=setting == "system", reworded=True)[:-1]


def task_accuracy(model, tokenizer, task: str, difficulty: int, n: int, seed: int = 0, max_tokens: int = 512,
                  keep_rows: bool = False, llm=None, setting: str = "canonical") -> TaskResult:
    """Greedy accuracy on n fresh held-out problems asked as `setting` says, in one continuous batch."""
    from openr2.engine.llm import LLM
    from openr2.engine.sampling import SamplingParams

    problems = held_out_problems(task, difficulty, n, seed)
    result = TaskResult(task, difficulty)
    if not problems:
        return result
    rng = random.Random(f"ask:{setting}:{task}:{difficulty}:{seed}")
    others = held_out_problems("addition" if task != "addition" else "subtraction", difficulty, len(problems),
                               seed + 1)
    chats = [_ask(p, setting, rng, others[i % len(others)] if others else p) for i, p in enumerate(problems)]
    was_training = model.training
    llm = llm or LLM(model, tokenizer, compile=False, max_num_seqs=128, max_num_batched_tokens=2048)  # batch work
    try:
        outs = llm.chat(chats, SamplingParams(temperature=0, max_tokens=max_tokens))
    finally:
        model.train(was_training)
    for p, chat, out in zip(problems, chats, outs):
        text = out.outputs[0].text
        answer = answer_of(text)
        ok = answer is not None and verify(p, answer)
        result.correct += ok
        result.total += 1
        if keep_rows:
            result.rows.append({"prompt": chat[-1]["content"], "expected": p.answer, "output": text, "correct": ok})
    return result


@torch.no_grad()
def held_out_loss(model, batches) -> float:
    """Mean token cross-entropy of the model over (input_ids, labels) batches (labels -100 = ignored)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for inputs, labels in batches:
            logits = model(inputs.to(model.device))
            labels = labels.to(model.device)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=IGNORE_INDEX, reduction="sum")
            total += loss.item()
            count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)
