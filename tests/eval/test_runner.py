"""The runner: results file, incremental saves, resume, summary, errors keeping results (openr2/eval/runner.py).
HTTP cases use the scripted endpoint of test_backends; local cases the tiny random checkpoint."""

from __future__ import annotations

import json
import os

import pytest

from openr2.billing import PriceTable
from openr2.engine.usage import Usage
from openr2.eval.backends import Completion, EndpointError, LocalBackend
from openr2.eval.runner import EvalConfig, run_eval, sample_seed
from tests.checkpoints import save_tiny_chat_checkpoint
from tests.eval.test_backends import REPLY, scripted


def _reply(content: str) -> dict:
    reply = json.loads(json.dumps(REPLY))
    reply["choices"][0]["message"]["content"] = content
    return reply


def test_http_samples_pass_at_k_majority_and_cost(tmp_path):
    out = tmp_path / "r.json"
    with scripted([(200, {}, _reply("So she makes \\boxed{18}."))]) as (url, log):
        results = run_eval(EvalConfig(task="gsm8k", base_url=url, model_name="m", limit=3, samples=4,
                                      concurrency=3, out=str(out)), progress=False)
    assert len(log) == 12
    seeds = sorted(body["seed"] for _, _, _, body in log)
    assert seeds == sorted(sample_seed(0, f"gsm8k-{i}", k) for i in range(3) for k in range(4))
    items = results["items"]
    assert [it["id"] for it in items] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]  # file order, whatever the finish order
    assert items[0]["num_correct"] == 4 and items[0]["maj_answer"] == "18" and items[0]["maj_correct"]
    assert items[1]["num_correct"] == 0 and not items[1]["maj_correct"]
    s = results["summary"]
    assert s["items"] == 3 and s["pass@1"] == pytest.approx(1 / 3) and s["maj@4"] == pytest.approx(1 / 3)
    assert s["pass@4"] == pytest.approx(1 / 3) and s["mean_reasoning_tokens"] == 3
    one = PriceTable().cost(Usage(10, 4, 6, 3))
    assert items[0]["cost_pico_usd"] == 4 * one and s["cost_pico_usd"] == 12 * one
    sample = items[0]["samples"][0]
    assert sample["reasoning"] == "2+2=4" and sample["content"] == "So she makes \\boxed{18}."
    assert sample["extracted"] == "18" and sample["correct"] and sample["completion_tokens"] == 6
    assert json.loads(out.read_text())["summary"] == s
    md = (tmp_path / "r.md").read_text()
    assert "| gsm8k | m | 3 | 4 | 33.3% | 33.3% | 33.3% |" in md


def test_failure_mid_run_keeps_results_and_resume_skips_them(tmp_path):
    out = str(tmp_path / "r.json")
    config = dict(task="gsm8k", base_url=None, model_name="m", limit=5, concurrency=1, out=out, temperature=0.0)
    script = [(200, {}, _reply("\\boxed{18}"))] * 2 + [(401, {}, {"error": {"message": "Invalid API key."}})]
    with scripted(script) as (url, _):
        with pytest.raises(EndpointError, match="HTTP 401: Invalid API key"):
            run_eval(EvalConfig(**{**config, "base_url": url}), progress=False, save_every_s=1e9)
    saved = json.loads(open(out).read())
    assert [it["id"] for it in saved["items"]] == ["gsm8k-0", "gsm8k-1"] and saved["summary"]["items"] == 2
    with scripted([(200, {}, _reply("\\boxed{1}"))]) as (url, log):
        results = run_eval(EvalConfig(**{**config, "base_url": url}), progress=False)
    assert len(log) == 3  # only the three unscored items are asked
    assert [it["id"] for it in results["items"]] == [f"gsm8k-{i}" for i in range(5)]
    assert results["items"][0]["samples"][0]["content"] == "\\boxed{18}"  # kept, not redone
    with pytest.raises(ValueError, match="temperature"):  # other settings would mix two runs in one file
        run_eval(EvalConfig(**{**config, "base_url": url, "temperature": 0.7}), progress=False)
    assert json.loads(open(out).read())["items"] == results["items"]


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        run_eval(EvalConfig(task="gsm8k"), progress=False)
    with pytest.raises(ValueError, match="--model-name"):
        run_eval(EvalConfig(task="gsm8k", base_url="http://127.0.0.1:1/v1"), progress=False)
    with pytest.raises(FileNotFoundError, match="checkpoint directory"):
        run_eval(EvalConfig(task="gsm8k", model=str(tmp_path / "none")), progress=False)
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an openr2 eval results file"):
        run_eval(EvalConfig(task="gsm8k", base_url="http://127.0.0.1:1/v1", model_name="m", out=str(tmp_path / "x.json")),
                 progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_tiny_chat_checkpoint(path)
    return path


def test_local_engine_synthetic_and_resume(tiny, tmp_path):
    out = str(tmp_path / "syn.json")
    config = EvalConfig(task="synthetic:addition:3", model=str(tiny), limit=3, samples=2, temperature=1.0,
                        max_tokens=12, out=out)
    first = run_eval(config, progress=False)
    assert first["summary"]["items"] == 3 and first["config"]["model"] == "tiny"
    for it in first["items"]:
        for s in it["samples"]:
            assert s["completion_tokens"] == 12 and s["prompt_tokens"] > 0 and s["reasoning"] is not None
    # the two samples of an item have their own seeds, so sampling differs; the same seeds reproduce them
    assert any(it["samples"][0]["reasoning"] != it["samples"][1]["reasoning"] for it in first["items"])
    again = run_eval(EvalConfig(**{**config.__dict__, "out": str(tmp_path / "b.json")}), progress=False)
    assert [it["samples"] for it in again["items"]] == [it["samples"] for it in first["items"]]

    class Counting(LocalBackend):
        asked = 0

        def run(self, requests):
            Counting.asked += len(requests)
            yield from super().run(requests)

    more = run_eval(EvalConfig(**{**config.__dict__, "limit": 4}), Counting(tiny), progress=False)
    assert Counting.asked == 2 and more["summary"]["items"] == 4  # only the new item's two samples ran
    assert more["items"][:3] == first["items"]
    assert os.path.exists(str(tmp_path / "syn.md"))


def test_local_refuses_what_the_server_would(tiny, tmp_path):
    """prompt + max_tokens past the context is a 400 from the server, so the local run refuses it too."""
    with pytest.raises(ValueError, match="lower --max-tokens"):
        run_eval(EvalConfig(task="gsm8k", model=str(tiny), limit=1, max_tokens=10_000, out=str(tmp_path / "r.json")),
                 progress=False)


def test_reasoning_is_never_graded(tmp_path):
    reply = _reply("I am not sure.")
    reply["choices"][0]["message"]["reasoning_content"] = "so the total is \\boxed{18}"
    with scripted([(200, {}, reply)]) as (url, _):
        results = run_eval(EvalConfig(task="gsm8k", base_url=url, model_name="m", limit=1, out=str(tmp_path / "r.json")),
                           progress=False)
    sample = results["items"][0]["samples"][0]
    assert sample["reasoning"] == "so the total is \\boxed{18}" and sample["extracted"] is None and not sample["correct"]


def test_ctrl_c_keeps_what_was_scored(tmp_path):
    class Interrupted:
        def run(self, requests):
            for r in requests[:2]:
                yield r, Completion("\\boxed{18}", None, "stop", Usage(5, 0, 1, 0))
            raise KeyboardInterrupt

    out = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        run_eval(EvalConfig(task="gsm8k", base_url="http://127.0.0.1:1/v1", model_name="m", limit=4, out=str(out)),
                 Interrupted(), progress=False, save_every_s=1e9)
    saved = json.loads(out.read_text())
    assert [it["id"] for it in saved["items"]] == ["gsm8k-0", "gsm8k-1"] and saved["summary"]["pass@1"] == 0.5


def test_default_max_tokens_fits_a_short_context(tmp_path):
    """Without --max-tokens a model with a small context is not refused: the cap is clipped to the room
    left, as the server does; the HTTP body then leaves max_tokens out."""
    import dataclasses

    from openr2.checkpoints import load_model, save_model
    from openr2.eval.backends import HTTPBackend, Request

    tiny = tmp_path / "tiny"
    save_tiny_chat_checkpoint(tiny)
    model = load_model(str(tiny))
    model.config = dataclasses.replace(model.config, max_position_embeddings=256)
    save_model(model, str(tiny))
    results = run_eval(EvalConfig(task="synthetic:addition:2", model=str(tiny), limit=2, temperature=0.0,
                                  out=str(tmp_path / "r.json")), progress=False)
    assert all(s["completion_tokens"] > 0 for it in results["items"] for s in it["samples"])
    body = HTTPBackend("http://127.0.0.1:1/v1", "m").body(Request("x", 0, [], 0.0, 1.0, None, 1))
    assert "max_tokens" not in body
