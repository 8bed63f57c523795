"""`openr2 train` and `openr2 tokenizer train` end to end on tiny runs: mixtures, evaluation through the
engine, plots, export, resume, and bad input rejected before any work."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from openr2.cli import main
from openr2.tasks.synthetic import held_out_problems, split_of
from openr2.train.evaluate import task_accuracy
from openr2.train.mixture import mixture_problems, parse_mixture
from openr2.train.run import RECIPES, config_from

PNG = b"\x89PNG\r\n\x1a\n"


def test_parse_mixture():
    items = parse_mixture("addition:1-4:2, countdown:3, modular")
    assert [(i.task, i.difficulty) for i in items] == [("addition", d) for d in range(1, 5)] + \
        [("countdown", 3)] + [("modular", d) for d in range(1, 5)]
    assert sum(i.weight for i in items if i.task == "addition") == pytest.approx(2.0)
    assert sum(i.weight for i in items if i.task == "modular") == pytest.approx(1.0)
    for bad in ["divide:2", "addition:0-3", "addition:3-2", "addition:x", "addition:2:-1", "", "addition:1:2:3"]:
        with pytest.raises(ValueError, match="tasks"):
            parse_mixture(bad)


def test_mixture_is_train_split_and_weighted():
    items = parse_mixture("addition:3:3,subtraction:3:1")
    problems = list(mixture_problems(items, 2000, seed=5))
    assert all(split_of(p) == "train" for p in problems)
    counts = Counter(p.task for p in problems)
    assert 0.70 < counts["addition"] / 2000 < 0.80
    assert [p.prompt for p in mixture_problems(items, 50, seed=5)] == [p.prompt for p in problems[:50]]


def test_held_out_problems_and_answers():
    problems = held_out_problems("addition", 3, 40, seed=1)
    assert len(problems) == 40 and len({p.key for p in problems}) == 40
    assert all(split_of(p) == "test" for p in problems)
    assert len(held_out_problems("addition", 1, 500)) < 20  # 1-digit addition has few test problems


def test_task_accuracy_through_the_engine():
    from openr2.model.transformer import build_model
    from openr2.presets import tiny_v3
    from tests.tokenizer_utils import tiny_tokenizer

    tok = tiny_tokenizer()
    import dataclasses
    model = build_model(dataclasses.replace(tiny_v3(), vocab_size=tok.vocab_size), seed=0)
    model.train()
    r = task_accuracy(model, tok, "addition", 2, 6, max_tokens=12, keep_rows=True)
    assert r.total == 6 and 0 <= r.correct <= 6 and len(r.rows) == 6
    assert all(row["output"] is not None and row["expected"] for row in r.rows)
    assert model.training  # restored


def _train(tmp_path: Path, *extra: str) -> int:
    out = tmp_path / "run"
    return main(["train", "--model", "tiny-v3", "--mode", "sft", "--tasks", "addition:1-2,subtraction:2",
                 "--num-examples", "300", "--steps", "6", "--batch-size", "4", "--seq-len", "160", "--lr", "3e-3",
                 "--warmup-steps", "2", "--vocab-size", "300", "--eval-tasks", "addition:2", "--eval-samples", "3",
                 "--eval-max-tokens", "24", "--eval-every", "3", "--out-dir", str(out), *extra])


@pytest.mark.slow
def test_train_cli_sft_end_to_end(tmp_path, capsys):
    assert _train(tmp_path, "--export", str(tmp_path / "export"), "--save-every", "3") == 0
    run = tmp_path / "run"
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [3, 6]
    assert evals[-1]["accuracy"]["addition:2"]["n"] == 3 and evals[-1]["eval_loss"] > 0
    for name in ("loss.png", "accuracy.png", "expert_load.png"):
        assert (run / name).read_bytes()[:8] == PNG, name
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["export"] == str(tmp_path / "export")
    # the export serves: our engine and transformers' tokenizer load it
    import transformers

    from openr2 import LLM, SamplingParams
    export = tmp_path / "export"
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] is not None
    card = (export / "README.md").read_text()
    assert "| addition | digits=2 | 3 |" in card and "![loss](loss.png)" in card and (export / "loss.png").is_file()
    out = LLM(str(export), compile=False).chat([{"role": "user", "content": "What is 12+34?"}], SamplingParams(max_tokens=4))
    assert len(out[0].outputs[0].token_ids) >= 1
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export))
    assert hf_tok.convert_tokens_to_ids("</think>") is not None
    # resume from the step-3 checkpoint repeats steps 4-6 exactly (deterministic by default)
    ref = [r["loss"] for r in log[3:]]
    assert _train(tmp_path, "--resume", str(run / "step-0000003")) == 0
    log2 = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log2] == list(range(1, 7)) and [r["loss"] for r in log2[3:]] == ref


@pytest.mark.slow
def test_train_cli_pretrain_on_text(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The number {i} is followed by {i + 1}." for i in range(300)))
    assert main(["train", "--model", "tiny-v2", "--data", str(corpus), "--steps", "4", "--batch-size", "4",
                 "--seq-len", "32", "--vocab-size", "300", "--out-dir", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-0000004"
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "steps"),
    (["--tasks", "addition:9-12"], "tasks"),
    (["--eval-tasks", "nope:1"], "eval_tasks"),
    (["--data", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
    (["--model", "no-such-model"], "model"),
    (["--distributed", "zero3"], "distributed"),
    (["--preset", "huge"], "preset"),
])
def test_bad_options_rejected_before_work(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    args = ["train", "--tasks", "addition:2", "--out-dir", str(out), *argv]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_config_file_and_resume(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('tasks = "addition:2"\nlearning_rate = 1e-3\n')
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "c.toml" in err
    assert main(["train", "--tasks", "addition:2", "--resume", str(tmp_path / "gone"),
                 "--out-dir", str(tmp_path / "o")]) == 2
    assert "gone" in capsys.readouterr().err


def test_tokenizer_train_cli(tmp_path):
    import transformers

    from openr2.tokenizer import Tokenizer
    text = tmp_path / "t.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"Line {i}: the quick brown fox."}) for i in range(200)))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--out", str(out), "--vocab-size", "320", "--data", str(text),
                 "--tasks", "addition:3", "--num-examples", "500"]) == 0
    ours, hf = Tokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(str(out))
    assert ours.vocab_size <= 320
    sample = "What is 347+589?<think>\n7+9+0=16\n</think>\n\n936"
    assert ours.encode(sample) == hf.encode(sample, add_special_tokens=False)
    assert all(len(ours.decode([i])) == 1 for i in ours.encode("347589"))  # one token per digit
    for special in ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                    "<think>", "</think>"):
        assert len(ours.encode(special)) == 1, special
    assert "{%" in json.loads((out / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_recipes_validate(preset):
    cfg = config_from(preset)  # every key known, every value possible, every named input present
    assert cfg.mode == "sft" and cfg.steps > 0
