"""The bundled demo model (openr2/assets/openr2-demo, trained by `openr2 train --preset demo`): complete, small,
accurate on held-out problems, matches transformers, answers "What is 347+589?" with its column work (also
through the server that `make run` starts) and in other wordings, after a system prompt and as a later turn,
says what it can do when asked anything else, and carries a trained MTP module."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

from openr2 import LLM, SamplingParams
from openr2.tokenizer import THINK_END
from tests.numerics import assert_same_function, reference64

DEMO = Path(__file__).resolve().parents[1] / "openr2" / "assets" / "openr2-demo"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
         "README.md")


@pytest.fixture(scope="module")
def llm():
    return LLM(str(DEMO), compile=False)


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
    assert "Problem: 347+589\n7+9+0=16, write 6 carry 1" in reasoning and "347+589=936" in reasoning, text
    assert answer.strip() == "936", text


def test_held_out_three_digit_addition(llm):
    from openr2.train.evaluate import task_accuracy

    result = task_accuracy(llm.engine.model, llm.tokenizer, "addition", 3, 200, seed=123, llm=llm)
    print(f"demo model, 200 fresh held-out 3-digit additions: {100 * result.accuracy:.1f}%")
    assert result.total == 200 and result.accuracy >= 0.97


def test_mtp_module_is_trained(llm):
    """The demo carries one MTP module (the engine's speculative draft), trained: its second-token drafts
    agree with the model's own next-next token on a worked answer far more often than chance."""
    model = llm.engine.model
    assert model.config.num_nextn_predict_layers == 1 and len(model.mtp) == 1
    ids = torch.tensor([llm.tokenizer.encode(
        "<｜begin▁of▁sentence｜><｜User｜>What is 347+589?<｜Assistant｜><think>\nProblem: 347+589\n"
        "7+9+0=16, write 6 carry 1\n4+8+1=13, write 3 carry 1\n3+5+1=9, write 9 carry 0\n347+589=936\n</think>")])
    with torch.no_grad():
        _, drafts = model(ids, with_mtp=True)
    hits = (drafts[0][0, :-1].argmax(-1) == ids[0, 2:]).float().mean().item()  # depth 1 at i drafts token i+2
    assert hits > 0.5, hits


@pytest.mark.parametrize("prompt, answer", [
    ("347 + 589 = ?", "936"), ("Add 512 and 199", "711"), ("what's 12+7", "19"), ("Compute 463 plus 278.", "741"),
    ("Subtract 199 from 512.", "313"),
])
def test_answers_other_wordings(llm, prompt, answer):
    out = llm.chat([{"role": "user", "content": prompt}], SamplingParams(temperature=0, max_tokens=200))
    assert out[0].outputs[0].text.partition(THINK_END)[2].strip() == answer, out[0].outputs[0].text


def test_system_prompt_second_turn_and_small_talk(llm):
    from openr2.tasks.synthetic import SMALLTALK_ANSWER

    chats = [[{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "What is 347+589?"}],
             [{"role": "user", "content": "What is 12+7?"}, {"role": "assistant", "content": "19"},
              {"role": "user", "content": "What is 512-199?"}],
             [{"role": "user", "content": "Hello! Who are you?"}]]
    outs = llm.chat(chats, SamplingParams(temperature=0, max_tokens=200))
    answers = [o.outputs[0].text.partition(THINK_END)[2].strip() for o in outs]
    assert answers == ["936", "313", SMALLTALK_ANSWER], answers


def test_transformers_gives_the_same_logits(llm):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(DEMO), dtype=torch.float32).eval()
    ids = torch.tensor([llm.tokenizer.encode("What is 347+589?<think>\n7+9+0=16")])
    with torch.no_grad():
        ours, theirs = llm.engine.model(ids), hf(ids).logits
    # each within a small factor of the other's float32 error against a float64 run of ours (tests/numerics.py)
    assert_same_function(ours, theirs, reference64(llm.engine.model, ids), what="demo model logits")


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
