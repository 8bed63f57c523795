"""Tool calls through HTTP with the official openai and anthropic clients.

A random-weight model never writes a tool call, so the round trips run on a scripted engine (tests/server/
_scripted.py) that answers like a DeepSeek model would: with a call in the template's V3 dialect when the
prompt shows tools and no tool output yet, then with an answer once the tool output is in the prompt. The
real tiny engine shows that a request with tools is rendered, run and answered on an actual model.
"""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from openr2.tokenizer import TOOL_OUTPUT_BEGIN
from openr2.tool_calls import V3
from tests.server._scripted import serve_scripted
from tests.tokenizer_utils import tiny_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "Weather in Paris and Oslo?"}]
CALLS = V3.calls_text([("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Oslo"}')])


def script(prompt: str) -> str:
    """A DeepSeek-like answer: think, then call the tools it was shown, or answer from their output."""
    thinking = "I should look it up.\n</think>\n\n" if prompt.endswith("<think>\n") else ""
    if TOOL_OUTPUT_BEGIN in prompt:
        return "It is 21C in Paris and 12C in Oslo."
    if "### get_weather" in prompt:
        return thinking + "Let me check." + CALLS
    return thinking + "No tools, no weather."


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    with serve_scripted(tiny_tokenizer(), script, tmp_path_factory.mktemp("data")) as running:
        yield running


def _openai(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, _strict_response_validation=True)


def test_a_tool_round_trip_with_the_openai_client(scripted):
    base_url, _, engine = scripted
    client = _openai(base_url)
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER])
    choice = first.choices[0]
    assert "### get_weather" in engine.prompts[-1] and "Description: Weather of a city" in engine.prompts[-1]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    assert choice.message.reasoning_content == "I should look it up."  # never in content, never parsed for calls
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
    history = [*ASK, {"role": "assistant", "content": choice.message.content, "tool_calls": [c.model_dump() for c in calls],
                      "reasoning_content": choice.message.reasoning_content},
               *[{"role": "tool", "tool_call_id": c.id, "content": f"{t}C"} for c, t in zip(calls, (21, 12))]]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER])
    assert answer.choices[0].message.content == "It is 21C in Paris and 12C in Oslo."
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.tool_calls is None
    assert V3.call_text("get_weather", '{"city": "Paris"}') in engine.prompts[-1]  # the past call, as the model wrote it
    assert engine.prompts[-1].count(TOOL_OUTPUT_BEGIN) == 2


def test_streamed_tool_calls_and_the_stream_helper(scripted):
    base_url, _, _ = scripted
    client = _openai(base_url)
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert [d.tool_calls[0].index for d in deltas] == [0, 1]
    assert all(d.tool_calls[0].id and d.tool_calls[0].function.name == "get_weather" for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Let me check."
    with client.chat.completions.stream(model="tiny", messages=ASK, tools=[WEATHER]) as stream:
        final = stream.get_final_completion()
    assert [json.loads(c.function.arguments)["city"] for c in final.choices[0].message.tool_calls] == ["Paris", "Oslo"]
    one = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1


def test_tool_choice_none_hides_the_tools(scripted):
    # tool_choice "required", named and strict tools are constrained decoding: tests/server/test_structured.py
    base_url, _, engine = scripted
    client = _openai(base_url)
    plain = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="none")
    assert "get_weather" not in engine.prompts[-1] and plain.choices[0].message.content == "No tools, no weather."


def test_tool_use_with_the_anthropic_client(scripted):
    base_url, _, _ = scripted
    client = anthropic.Anthropic(base_url=base_url + "/anthropic", api_key="unused", max_retries=0)
    tool = {"name": "get_weather", "description": "Weather of a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    msg = client.messages.create(model="tiny", max_tokens=200, messages=ASK, tools=[tool])
    assert msg.stop_reason == "tool_use"
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use", "tool_use"]
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
    with client.messages.stream(model="tiny", max_tokens=200, messages=ASK, tools=[tool]) as stream:
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [(b.type, getattr(b, "input", None))
                                                                          for b in msg.content]
    assert final.stop_reason == "tool_use"
    results = [{"type": "tool_result", "tool_use_id": u.id, "content": f"{t}C"} for u, t in zip(uses, (21, 12))]
    answer = client.messages.create(model="tiny", max_tokens=200, tools=[tool], messages=[
        *ASK, {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
        {"role": "user", "content": results}])
    assert answer.stop_reason == "end_turn" and answer.content[-1].text == "It is 21C in Paris and 12C in Oslo."
    forced = client.messages.create(model="tiny", max_tokens=200, messages=ASK, tools=[tool],
                                    tool_choice={"type": "any"})  # OpenAI's "required": constrained decoding
    assert forced.stop_reason == "tool_use"


def test_tools_on_the_real_tiny_model(live):
    base_url, _ = live
    client = _openai(base_url)
    without = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2)
    shown = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, tools=[WEATHER])
    assert shown.usage.prompt_tokens > without.usage.prompt_tokens + 50  # the tools are in the prompt
    choice = shown.choices[0]
    assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)  # never tool_calls without
