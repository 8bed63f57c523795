"""DeepSeek-V3.2's DSML tool calls through HTTP with the official openai client: a template-less checkpoint of
model_type deepseek_v32 is rendered with the release's encoder and speaks its dialect.

A scripted engine answers in DSML as the real model would (calls parsed whole and streamed, the follow-up
turn rendered as the encoder does); a random-weight deepseek_v32 checkpoint shows a named tool_choice
constrained to a call whose arguments validate, and the turn after it rendered and run."""

from __future__ import annotations

import dataclasses
import json

import anthropic
import jsonschema
import openai
import pytest
import torch

from openr2.checkpoints import save_model
from openr2.dsml import V32
from openr2.model.transformer import build_model
from openr2.presets import tiny_v32
from openr2.server.app import ServerConfig
from openr2.tokenizer import Tokenizer
from tests.server._live import serve
from tests.server._scripted import serve_scripted
from tests.tokenizer_utils import tiny_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 3}},
                   "required": ["city", "days"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALLS = V32.calls_text([("get_weather", '{"city": "Paris", "days": 2}')])
# a call of a tool that was not offered, then one whose integer is no JSON
BROKEN = V32.calls_text([("get_time", "{}"), ("get_weather", '{"city": "Paris", "days": 2}')]).replace(
    'string="false">2<', 'string="false">two<')


def _bare_tokenizer() -> Tokenizer:
    """The tiny tokenizer without a chat template, as DeepSeek-V3.2's release ships its own."""
    tok = tiny_tokenizer()
    return Tokenizer(tok.backend, tok.bos_token, tok.eos_token, tok.eos_token, None)


def script(prompt: str) -> str:
    """A DeepSeek-like answer: think when the prompt opens <think>, call the tool it was shown, or answer from
    its result (the tools prompt itself shows <function_results>, so look for a <result>)."""
    think = "Look it up.</think>" if prompt.endswith("<think>") else ""
    if "Broken?" in prompt:
        return BROKEN
    if "<result>" in prompt:
        return think + "It is 21C in Paris."
    return think + ("Let me check." + CALLS if "<functions>" in prompt else "No tools.")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    with serve_scripted(_bare_tokenizer(), script, tmp_path_factory.mktemp("data"),
                        model_type="deepseek_v32") as running:
        yield running


def _openai(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, _strict_response_validation=True)


def test_a_dsml_round_trip_whole_and_streamed(scripted):
    base_url, server, engine = scripted
    assert server.template.tools.dialect is V32 and server.template.thinking_modes == {True, False}
    client = _openai(base_url)
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    assert engine.prompts[-1].endswith("<｜User｜>Weather in Paris?<｜Assistant｜></think>")  # chat mode
    history = [*ASK, {"role": "assistant", "content": choice.message.content,
                      "tool_calls": [c.model_dump() for c in choice.message.tool_calls]},
               {"role": "tool", "tool_call_id": call.id, "content": "21C"}]
    follow = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER])
    assert follow.choices[0].message.content == "It is 21C in Paris." and not follow.choices[0].message.tool_calls
    assert engine.prompts[-1].endswith(
        '<｜Assistant｜></think>Let me check.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        '</｜DSML｜function_calls><｜end▁of▁sentence｜>\n\n<function_results>\n<result>21C</result>\n'
        '</function_results>\n\n</think>')
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert text == "Let me check." and [d.function.name for d in deltas if d.function.name] == ["get_weather"]
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris", "days": 2}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_anthropic_tool_use_and_results_in_dsml(scripted):
    base_url, _, engine = scripted
    client = anthropic.Anthropic(base_url=base_url + "/anthropic", api_key="unused", max_retries=0)
    tool = {"name": "get_weather", "description": "Weather of a city", "input_schema": WEATHER["function"]["parameters"]}
    msg = client.messages.create(model="tiny", max_tokens=2000, messages=ASK, tools=[tool])
    assert msg.stop_reason == "tool_use" and [b.type for b in msg.content] == ["text", "tool_use"]
    use = msg.content[1]
    assert (use.name, use.input) == ("get_weather", {"city": "Paris", "days": 2})
    answer = client.messages.create(model="tiny", max_tokens=2000, tools=[tool], messages=[
        *ASK, {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21C"}]}])
    assert answer.stop_reason == "end_turn" and answer.content[-1].text == "It is 21C in Paris."
    assert "<function_results>\n<result>21C</result>\n</function_results>" in engine.prompts[-1]


def test_malformed_calls_come_back_as_text(scripted):
    client = _openai(scripted[0])
    ask = [{"role": "user", "content": "Broken?"}]
    whole = client.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER]).choices[0]
    assert whole.finish_reason == "stop" and not whole.message.tool_calls
    assert 'invoke name="get_time"' in whole.message.content and ">two<" in whole.message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)


def test_thinking_tool_turns_carry_their_reasoning_back(scripted):
    base_url, _, engine = scripted
    client = _openai(base_url)
    thinking = {"thinking": {"type": "enabled"}}
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], extra_body=thinking)
    message = first.choices[0].message
    assert message.reasoning_content == "Look it up." and message.tool_calls[0].function.name == "get_weather"
    history = [*ASK, {"role": "assistant", "content": message.content, "reasoning_content": message.reasoning_content,
                      "tool_calls": [c.model_dump() for c in message.tool_calls]},
               {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "21C"}]
    follow = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], extra_body=thinking)
    assert follow.choices[0].message.reasoning_content == "Look it up."
    assert follow.choices[0].message.content == "It is 21C in Paris."
    prompt = engine.prompts[-1]  # the tool loop's reasoning is in the prompt, and thinking reopens after results
    assert "<｜Assistant｜><think>Look it up.</think>Let me check.\n\n<｜DSML｜function_calls>" in prompt
    assert prompt.endswith("</function_results>\n\n<think>")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A random-weight deepseek_v32 checkpoint whose tokenizer has no chat template."""
    tokenizer, ckpt = _bare_tokenizer(), tmp_path_factory.mktemp("ckpt")
    config = dataclasses.replace(tiny_v32(), vocab_size=tokenizer.vocab_size, num_nextn_predict_layers=0,
                                 eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                 max_position_embeddings=2048)
    model = build_model(config, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    save_model(model, ckpt)
    tokenizer.save_pretrained(ckpt)
    with serve(ckpt, tmp_path_factory.mktemp("data"), ServerConfig(model_name="tiny", default_max_tokens=16)) as s:
        yield s


def test_a_named_tool_choice_on_a_random_v32_checkpoint_validates_and_the_next_turn_renders(live):
    base_url, server = live
    assert server.template.tools.dialect is V32
    client = _openai(base_url)
    first = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], max_tokens=300, temperature=1.0, seed=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    history = [*ASK, {"role": "assistant", "content": choice.message.content,
                      "tool_calls": [c.model_dump() for c in choice.message.tool_calls]},
               {"role": "tool", "tool_call_id": call.id, "content": "21C and sunny"}]
    follow = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=8)
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls") and follow.usage.completion_tokens > 0


def test_strict_tools_under_auto_on_a_random_v32_checkpoint(live):
    """Accepted (the grammar watches for DSML's multi-token opening marker: tests/test_dsml.py shows every block
    a random "model" opens validating); whatever this random model writes, a call it makes validates."""
    base_url, server = live
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    assert server.template.tools.dialect is V32
    for seed in range(3):
        answer = _openai(base_url).chat.completions.create(model="tiny", messages=ASK, tools=[strict], max_tokens=24,
                                                           temperature=1.0, seed=seed)
        choice = answer.choices[0]
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        for call in choice.message.tool_calls or []:
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_v4_reasoning_effort_through_http(tmp_path):
    """reasoning_effort on a template-less deepseek_v4 checkpoint: "max" / "xhigh" put the release's
    maximum-effort preamble before the conversation, the other levels think without it, "none" does not think."""
    from openr2.dsml_encoding import REASONING_EFFORT_MAX

    with serve_scripted(_bare_tokenizer(), lambda prompt: "Done.", tmp_path, model_type="deepseek_v4") as (
            base_url, server, engine):
        assert server.template.effort_levels
        client = _openai(base_url)
        for effort, preamble, ending in (("max", True, "<think>"), ("xhigh", True, "<think>"),
                                         ("medium", False, "<think>"), ("none", False, "</think>")):
            client.chat.completions.create(model="tiny", messages=ASK, reasoning_effort=effort)
            prompt = engine.prompts[-1]
            assert prompt.startswith("<｜begin▁of▁sentence｜>" + REASONING_EFFORT_MAX) == preamble, effort
            assert prompt.endswith("<｜User｜>Weather in Paris?<｜Assistant｜>" + ending), effort
