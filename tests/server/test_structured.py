"""Structured output and forced tool calls through HTTP with the official openai client, on the tiny
random-weight chat model: what it writes is noise, so an answer that validates comes from constrained
decoding, not from the model. Schemas bound their strings and arrays so that every answer ends (a grammar
guarantees the shape, not the length); thinking is off, since a random model's reasoning never ends."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
import torch

import openr2
from openr2.checkpoints import save_model
from openr2.model.transformer import build_model
from openr2.presets import tiny_v3
from openr2.server.app import ServerConfig
from tests.server._live import serve
from tests.tokenizer_utils import tiny_tokenizer

SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 8},
                         "temp": {"type": "integer", "minimum": -50, "maximum": 60},
                         "sky": {"enum": ["clear", "cloudy", "rain"]},
                         "alerts": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 5}},
                         "wind": {"type": "object", "properties": {"dir": {"enum": ["N", "E", "S", "W"]},
                                                                   "gusty": {"type": "boolean"}},
                                  "required": ["dir", "gusty"], "additionalProperties": False}},
          "required": ["city", "temp", "sky", "alerts", "wind"], "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
NO_THINKING = {"thinking": {"type": "disabled"}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
                   "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The tiny random chat model (tests/checkpoints.py's) with a 2048-token context: a tools prompt in the
    tiny 512-token vocabulary is several hundred tokens long."""
    tokenizer, ckpt = tiny_tokenizer(), tmp_path_factory.mktemp("ckpt")
    config = dataclasses.replace(tiny_v3(), vocab_size=tokenizer.vocab_size, num_nextn_predict_layers=0,
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


def _client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, _strict_response_validation=True)


def test_json_schema_strict_output_always_validates_on_100_prompts(live):
    client = _client(live[0])

    def ask(i: int):
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Weather report {i}: what is {i}+{i * 7}?"}],
            response_format=RESPONSE_FORMAT, max_tokens=300, temperature=1.0, seed=i, extra_body=NO_THINKING)

    with ThreadPoolExecutor(8) as pool:  # several at once: constrained rows share the engine's batches
        answers = list(pool.map(ask, range(100)))
    texts = set()
    for answer in answers:
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        texts.add(choice.message.content)
    assert len(texts) > 50  # the model's noise picks among the allowed tokens: the answers differ


def test_json_object_and_streaming_and_completions(live):
    client = _client(live[0])
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                            response_format={"type": "json_object"}, max_tokens=400, temperature=0,
                                            extra_body=NO_THINKING)
    content = answer.choices[0].message.content
    assert content.startswith("{")
    if answer.choices[0].finish_reason == "stop":  # an unbounded object may run out of tokens
        assert isinstance(json.loads(content), dict)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Stream it"}],
                                            response_format=RESPONSE_FORMAT, max_tokens=300, stream=True,
                                            extra_body=NO_THINKING)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    completion = client.completions.create(model="tiny", prompt="The weather:", max_tokens=300,
                                           extra_body={"response_format": RESPONSE_FORMAT})
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMA)


def _named_weather_call(client, model, tools, seed, max_tokens):
    """Ask with tool_choice naming get_weather: exactly one call, to it, whose arguments validate; returns the
    conversation with that call and the tool's result, ready for the follow-up turn."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=model, messages=ask, tools=tools, max_tokens=max_tokens, temperature=1.0, seed=seed,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body=NO_THINKING)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    return [*ask, {"role": "assistant", "content": choice.message.content,
                   "tool_calls": [c.model_dump() for c in choice.message.tool_calls]},
            {"role": "tool", "tool_call_id": call.id, "content": "21C and sunny"}]


def test_named_tool_choice_returns_arguments_that_validate_and_the_next_turn_answers(live):
    client = _client(live[0])
    for seed in range(5):
        history = _named_weather_call(client, "tiny", [WEATHER, TIME], seed, max_tokens=400)
    follow = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER, TIME], max_tokens=8,
                                            extra_body=NO_THINKING)
    assert follow.choices[0].finish_reason in ("stop", "length") and follow.usage.completion_tokens > 0


def test_a_streamed_named_tool_call(live):
    client = _client(live[0])
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Paris?"}], tools=[WEATHER], max_tokens=400, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body=NO_THINKING))
    calls = [d.tool_calls[0] for c in chunks if c.choices for d in [c.choices[0].delta] if d.tool_calls]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_tool_choice_calls_one_of_the_tools(live):
    client = _client(live[0])
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    names = set()
    for seed in range(6):
        answer = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Use a tool"}], tools=[WEATHER, TIME],
            tool_choice="required", parallel_tool_calls=False, max_tokens=400, temperature=1.0, seed=seed,
            extra_body=NO_THINKING)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        names.add(call.function.name)
    assert names  # which tool is the model's choice


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "nope"}}}}}], "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_schemas_and_choices_are_400s(live, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        _client(live[0]).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=4, extra_body=extra)
    assert err.value.status_code == 400 and err.value.body["param"] == param


def test_strict_tools_under_auto_are_accepted(live):
    # a random model seldom opens a calls block; whatever it writes, a call it makes has valid arguments
    answer = _client(live[0]).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], max_tokens=16,
        extra_body=NO_THINKING)
    for call in answer.choices[0].message.tool_calls or []:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_anthropic_tool_choice_and_output_format(live):
    import anthropic

    client = anthropic.Anthropic(base_url=live[0] + "/anthropic", api_key="unused", max_retries=0)
    tool = {"name": WEATHER["function"]["name"], "description": "Weather of a city",
            "input_schema": WEATHER["function"]["parameters"]}
    # one call each (parallel calls off): a random model may otherwise go on opening calls until max_tokens
    for choice in ({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
                   {"type": "any", "disable_parallel_tool_use": True}):
        msg = client.messages.create(model="tiny", max_tokens=400, messages=[{"role": "user", "content": "Paris?"}],
                                     tools=[tool], tool_choice=choice, thinking={"type": "disabled"})
        uses = [b for b in msg.content if b.type == "tool_use"]
        assert msg.stop_reason == "tool_use" and len(uses) >= 1
        for use in uses:
            jsonschema.validate(use.input, tool["input_schema"])
    msg = client.messages.create(model="tiny", max_tokens=300, messages=[{"role": "user", "content": "Report"}],
                                 thinking={"type": "disabled"},
                                 extra_body={"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}})
    assert msg.stop_reason == "end_turn"
    jsonschema.validate(json.loads(msg.content[-1].text), SCHEMA)


@pytest.fixture(scope="module")
def demo_live(tmp_path_factory):
    """The bundled demo model (openr2/assets/openr2-demo) as `openr2 serve` serves it."""
    demo = Path(openr2.__file__).parent / "assets" / "openr2-demo"
    with serve(demo, tmp_path_factory.mktemp("data"), ServerConfig(model_name="demo")) as s:
        yield s


def test_a_named_tool_choice_on_the_demo_model_validates_and_the_follow_up_answers(demo_live):
    """The issue's first check, on the bundled demo model itself: the call's arguments validate, and the turn
    with the tool's result gets an answer."""
    client = _client(demo_live[0])
    history = _named_weather_call(client, "demo", [WEATHER], seed=0, max_tokens=200)
    follow = client.chat.completions.create(model="demo", messages=history, tools=[WEATHER], max_tokens=64,
                                            extra_body=NO_THINKING)
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls") and follow.usage.completion_tokens > 0
