"""The bundled demo model (openr2/assets/openr2-demo, trained by `openr2 train --preset demo`): complete, small,
accurate on held-out problems, matches transformers, and answers "What is 347+589?" with its column work,
also through the server that `make run` starts."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

from openr2 import LLM, SamplingParams
from openr2.tokenizer import THINK_END

DEMO = Path(__file__).resolve().parents[1] / "openr2" / "assets" / "openr2-demo"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
         "README.md")


@pytest.fixture(scope="module")
def llm():
    return LLM(str(DEMO))


def test_bundle_is_complete_and_small():
    for name in FILES:
        assert (DEMO / name).is_file(), name
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= 30 * 2**20, size
    card = (DEMO / "README.md").read_text()
    assert "openr2 train --preset demo" in card and "| addition | digits=3 | 500 |" in card


def test_column_work_and_answer(llm):
    out = llm.chat([{"role": "user", "content": "What is 347+589?"}], SamplingParams(temperature=0, max_tokens=200))
    text = out[0].outputs[0].text
    reasoning, _, answer = text.partition(THINK_END)
    assert "7+9+0=16, write 6 carry 1" in reasoning and "347+589=936" in reasoning, text
    assert answer.strip() == "936", text


def test_held_out_three_digit_addition(llm):
    from openr2.train.evaluate import task_accuracy

    result = task_accuracy(llm.engine.model, llm.tokenizer, "addition", 3, 200, seed=123, llm=llm)
    print(f"demo model, 200 fresh held-out 3-digit additions: {100 * result.accuracy:.1f}%")
    assert result.total == 200 and result.accuracy >= 0.97


def test_transformers_gives_the_same_logits(llm):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(DEMO), dtype=torch.float32).eval()
    ids = torch.tensor([llm.tokenizer.encode("What is 347+589?<think>\n7+9+0=16")])
    with torch.no_grad():
        ours, theirs = llm.engine.model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.slow
def test_served_like_make_run(tmp_path):
    from openr2.server.app import ServerConfig
    from tests.server._live import serve

    with serve(DEMO, tmp_path, ServerConfig(model_name="openr2-demo")) as (base_url, _):
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                               _strict_response_validation=True)
        resp = client.chat.completions.create(model="openr2-demo", temperature=0, max_tokens=200,
                                              messages=[{"role": "user", "content": "What is 347+589?"}])
    message = resp.choices[0].message
    assert "7+9+0=16" in message.reasoning_content and message.content.strip() == "936"
    assert resp.usage.completion_tokens_details.reasoning_tokens > 0
