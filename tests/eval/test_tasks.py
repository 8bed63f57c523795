"""Task loading: formats, ids, prompts, the GPQA shuffle and errors that name file and line (openr2/eval/tasks.py)."""

from __future__ import annotations

import json

import pytest

from openr2.eval import tasks
from openr2.tasks.synthetic import held_out_problems


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_bundled_tasks():
    gsm = tasks.load_items("gsm8k", limit=3)
    assert [it.id for it in gsm] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    assert gsm[0].gold == "18" and gsm[0].kind == "math"
    assert gsm[0].prompt.endswith(tasks.MATH_INSTRUCTION) and "Janet" in gsm[0].prompt
    math = tasks.load_items("math500", limit=2)
    assert math[0].id == "test/precalculus/807.json" and "\\frac{\\pi}{2}" in math[0].gold
    arc = tasks.load_items("arc", limit=2)
    assert arc[0].gold == "C" and arc[0].choices[2] == "Planetary days will become shorter."
    assert "C) Planetary days" in arc[0].prompt and arc[0].prompt.endswith(tasks.CHOICE_INSTRUCTION)


def test_gsm8k_gold_loses_commas(tmp_path):
    path = _write(tmp_path / "g.jsonl", [{"question": "q?", "answer": "work\n#### 1,234"}])
    assert tasks.load_items("gsm8k", path)[0].gold == "1234"


def test_aime_format(tmp_path):
    path = _write(tmp_path / "aime.jsonl", [{"id": "2024-I-1", "problem": "Find x.", "answer": 204}, "",
                                            {"id": "2024-I-2", "problem": "Find y.", "answer": "33"}])
    items = tasks.load_items("aime", path)
    assert [(it.id, it.gold, it.kind) for it in items] == [("2024-I-1", "204", "integer"), ("2024-I-2", "33", "integer")]
    assert items[0].prompt == "Find x.\n" + tasks.MATH_INSTRUCTION


def test_gpqa_shuffles_per_question_and_remaps(tmp_path):
    rows = [{"id": f"q{i}", "question": f"Question {i}?", "choices": [f"right{i}", "w1", "w2", "w3"],
             "answer_index": 0} for i in range(20)]
    path = _write(tmp_path / "gpqa.jsonl", rows)
    items = tasks.load_items("gpqa", path)
    for it in items:
        index = "ABCD".index(it.gold)
        assert it.choices[index] == f"right{it.id[1:]}" and sorted(it.choices[:index] + it.choices[index + 1:]) == \
            ["w1", "w2", "w3"]
        assert f"{it.gold}) right{it.id[1:]}" in it.prompt
    assert len({it.gold for it in items}) > 1  # the right answer is not always in the same place
    assert [it.choices for it in tasks.load_items("gpqa", path)] == [it.choices for it in items]  # stable
    assert [it.choices for it in tasks.load_items("gpqa", path, seed=1)] != [it.choices for it in items]


def test_synthetic_uses_held_out_problems():
    items = tasks.load_items("synthetic:addition:4", limit=5, seed=2)
    problems = held_out_problems("addition", 4, 5, seed=2)
    assert [it.id for it in items] == [p.key for p in problems] and [it.gold for it in items] == [p.answer for p in problems]
    assert items[0].messages == [{"role": "user", "content": problems[0].prompt}]
    assert tasks.parse_synthetic("synthetic:countdown") == ("countdown", 3)


@pytest.mark.parametrize("task", ["gsm9k", "synthetic:division", "synthetic:addition:99", "synthetic:addition:x", ""])
def test_unknown_task(task):
    with pytest.raises(ValueError, match="task"):
        tasks.load_items(task)


def test_errors_name_file_and_line(tmp_path):
    good = {"question": "q?", "answer": "#### 1"}
    path = _write(tmp_path / "bad.jsonl", [good, "", good, "{not json"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:4: invalid JSON"):
        tasks.load_items("gsm8k", path)
    path = _write(tmp_path / "nofield.jsonl", [good, {"question": "q?"}])
    with pytest.raises(ValueError, match=r"nofield\.jsonl:2: missing field 'answer'"):
        tasks.load_items("gsm8k", path)
    path = _write(tmp_path / "g.jsonl", [{"question": "q", "choices": ["a", "b", "c"], "answer_index": 0}])
    with pytest.raises(ValueError, match=r"g\.jsonl:1: field 'choices' must have 4"):
        tasks.load_items("gpqa", path)
    path = _write(tmp_path / "a.jsonl", [{"id": 1, "problem": "p", "answer": "x"}])
    with pytest.raises(ValueError, match=r"a\.jsonl:1: field 'answer' must be an integer"):
        tasks.load_items("aime", path)
    path = _write(tmp_path / "dup.jsonl", [{"id": 1, "problem": "p", "answer": 1}, {"id": 1, "problem": "q", "answer": 2}])
    with pytest.raises(ValueError, match=r"dup\.jsonl:2: id '1' repeats line 1"):
        tasks.load_items("aime", path)
    with pytest.raises(ValueError, match="--data"):
        tasks.load_items("aime")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        tasks.load_items("gsm8k", str(tmp_path / "nope.jsonl"))
