"""Wordings (openr2/tasks/wordings.py): templates and system prompts split into train and held-out sets that
never meet, rewording keeps the problem, and a worded chat asks the problem last after its earlier turns."""

from __future__ import annotations

import random
import re

import pytest

from openr2.tasks.synthetic import SMALLTALK_ANSWER, addition_problem, generate, subtraction_problem, verify
from openr2.tasks.wordings import operands, reword, system_prompts, templates, worded_chat
from openr2.train.mixture import mixture_examples, parse_mixture
from tests.tokenizer_utils import tiny_tokenizer


@pytest.mark.parametrize("op", "+-*")
def test_templates_split_disjoint_and_canonical_in_train(op):
    train, test = templates(op, "train"), templates(op, "test")
    # ~20% of templates held out: many on each side, disjoint
    assert not set(train) & set(test) and len(test) >= 20 and len(train) >= 2 * len(test)
    assert train[0] == "What is {a}" + op + "{b}?" and all("{a}" in t and "{b}" in t for t in train + test)
    assert not set(system_prompts("train")) & set(system_prompts("test")) and system_prompts("test")


def test_reword_keeps_problem_and_uses_split_templates():
    p = subtraction_problem(512, 199)
    assert operands(p) == (512, "-", 199)
    rng = random.Random(0)
    # every held-out rewording comes from a held-out template (modulo case and end punctuation)
    held_out = {re.sub(r"[.?!= ]+$", "", t.format(a=512, b=199).lower()) for t in templates("-", "test")}
    for _ in range(200):
        q = reword(p, rng, "test")
        assert (q.answer, q.key, q.reasoning) == (p.answer, p.key, p.reasoning)
        assert "512" in q.prompt and "199" in q.prompt
        assert re.sub(r"[.?!= ]+$", "", q.prompt.lower()) in held_out, q.prompt
    countdown = next(generate("countdown", 2, "train", 1))
    assert reword(countdown, rng) == countdown  # not binary arithmetic: left as it is


def _matches(text: str, split: str) -> bool:
    """Is text one of the split's templates filled with numbers (any case, any end punctuation)?"""
    def pattern(t):
        return re.escape(re.sub(r"[.?!= ]+$", "", t)).replace(r"\{a\}", r"\d+").replace(r"\{b\}", r"\d+")
    core = re.sub(r"[.?!= ]+$", "", text)
    return any(re.fullmatch(pattern(t), core, re.IGNORECASE) for op in "+-*" for t in templates(op, split))


def test_training_chats_never_use_held_out_templates_or_system_prompts():
    rng = random.Random(3)
    problems = list(generate("addition", 3, "train", 150)) + list(generate("subtraction", 3, "train", 150))
    for p in problems:
        chat = worded_chat(p, rng, [problems[rng.randrange(len(problems))]])
        for m in chat:
            if m["role"] == "user":
                assert _matches(m["content"], "train") and not _matches(m["content"], "test"), m["content"]
            if m["role"] == "system":
                assert m["content"] in system_prompts("train")
    tok = tiny_tokenizer()  # and the SFT mixture puts them in examples, some with earlier turns
    examples = mixture_examples(parse_mixture("addition:3,subtraction:3"), 50, tok, seed=3, chat_variety=1.0)
    assert any(tok.decode(ids).count("<｜User｜>") > 1 for ids, _ in examples)


def test_worded_chat_asks_the_problem_last():
    rng = random.Random(1)
    p, earlier = addition_problem(347, 589), [subtraction_problem(80, 3)]
    chat = worded_chat(p, rng, earlier, split="test", system=True, reworded=True)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant"]
    assert chat[0]["content"] in system_prompts("test") and chat[2]["content"] == "77"
    assert chat[-1]["content"] == f"<think>\n{p.reasoning}\n</think>\n\n936"
    assert "347" in chat[-2]["content"] and "589" in chat[-2]["content"]


def test_smalltalk_task():
    problems = list(generate("smalltalk", 1, "test", 10, unique=True))
    assert all(p.answer == SMALLTALK_ANSWER and verify(p, SMALLTALK_ANSWER) and not verify(p, "42") for p in problems)
    assert not any(re.search(r"\d", p.prompt) for p in problems)
    train_keys = {p.key for p in generate("smalltalk", 1, "train", 2000)}
    assert not train_keys & {p.key for p in problems}
