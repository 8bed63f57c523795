"""Anthropic's request translated into a chat body, and the event sequence of a streamed message, without a server."""

from __future__ import annotations

import json

import pytest

from openr2.engine.engine import CompletionOutput, RequestOutput
from openr2.engine.usage import Usage
from openr2.server.anthropic_protocol import MessagesRequest, MessageStream, message_from_output, to_chat_body
from openr2.server.errors import APIError

BASE = {"model": "m", "max_tokens": 2000}


def _body(**kw):
    return to_chat_body(MessagesRequest.parse({**BASE, **kw}))


def test_blocks_become_chat_messages():
    body = _body(system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Really."}],
                 thinking={"type": "enabled", "budget_tokens": 1024}, stop_sequences=["END"], top_k=5,
                 messages=[
                     {"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": [
                         {"type": "thinking", "thinking": "use the tool", "signature": "x"},
                         {"type": "redacted_thinking", "data": "..."},
                         {"type": "text", "text": "Checking."},
                         {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]},
                     {"role": "user", "content": [
                         {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "21C"}]},
                         {"type": "text", "text": "And tomorrow?"}]},
                 ])
    assert body["messages"] == [
        {"role": "system", "content": "Be brief.\nReally."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "use the tool",
         "tool_calls": [{"id": "toolu_1", "type": "function",
                         "function": {"name": "weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "21C"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert (body["thinking"], body["stop"], body["top_k"], body["max_tokens"]) == \
        ({"type": "enabled"}, ["END"], 5, 2000)
    assert "temperature" not in body and "tools" not in body


def test_a_last_assistant_turn_is_a_prefill_and_adaptive_thinking_is_the_default():
    body = _body(thinking={"type": "adaptive"}, messages=[
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t"}, {"type": "text", "text": "The"}]}])
    assert body["messages"][-1] == {"role": "assistant", "content": "The", "prefix": True}
    assert "thinking" not in body


def test_tools_and_tool_choice_map_onto_openais():
    tool = {"name": "f", "description": "d", "input_schema": {"type": "object", "properties": {}}}
    for choice, expected in ((None, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
                             ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}})):
        body = _body(messages=[{"role": "user", "content": "Q"}], tools=[tool], tool_choice=choice)
        assert body["tools"] == [{"type": "function", "function": {"name": "f", "description": "d",
                                                                   "parameters": tool["input_schema"]}}]
        assert body["tool_choice"] == expected


@pytest.mark.parametrize("patch,param", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": [3]}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": 7}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": []}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "Q"}], "tools": [{"name": "f"}], "tool_choice": {"type": ["x"]}},
     "tool_choice"),
    ({"messages": [{"role": "user", "content": "Q"}], "tools": [{"input_schema": {}}]}, "tools[0].name"),
    ({"messages": [{"role": "user", "content": "Q"}], "system": [{"type": "text"}]}, "system[0]"),
])
def test_blocks_it_cannot_take_are_400s_naming_them(patch, param):
    with pytest.raises(APIError) as err:
        _body(**patch)
    assert (err.value.status, err.value.param) == (400, param)


@pytest.mark.parametrize("patch,param", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": 1.2}, "temperature"), ({"messages": []}, "messages"),
    ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 1024}, "thinking.budget_tokens"),
    ({"thinking": {"type": "sometimes"}}, "thinking.type"), ({"stop_sequences": [""]}, "stop_sequences"),
    ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format"),
])
def test_bad_requests_name_the_field(patch, param):
    with pytest.raises(APIError) as err:
        MessagesRequest.parse({**BASE, "messages": [{"role": "user", "content": "Q"}], **patch})
    assert (err.value.status, err.value.param) == (400, param)


def _output(deltas: list[str], finish_reason=None, stop_reason=None, done=True) -> list[RequestOutput]:
    outs, text = [], ""
    for k, delta in enumerate(deltas):
        text += delta
        last = done and k == len(deltas) - 1
        out = CompletionOutput(index=0, text=text, text_delta=delta, finish_reason=finish_reason if last else None,
                               stop_reason=stop_reason if last else None)
        outs.append(RequestOutput("r", None, [1, 2, 3], [out], last, Usage(10, 4, k + 1)))
    return outs


def _events(stream: MessageStream, outputs) -> list[dict]:
    frames = stream.start(outputs[0])
    for out in outputs:
        frames += stream.feed(out)
    frames += stream.finish(outputs[-1])
    return [json.loads(f.split("\n")[1].removeprefix("data: ")) for f in frames]


def test_stream_events_thinking_then_text_with_usage_and_stop_sequence():
    outputs = _output(["plan", " it\n</think>", "\n\nThe ", "answer"], "stop", "END")
    events = _events(MessageStream("msg_1", "m", starts_in_reasoning=True, clipped=False), outputs)
    assert [e["type"] for e in events] == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
        "content_block_delta", "content_block_stop", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert events[0]["message"]["usage"] == {"input_tokens": 6, "output_tokens": 1, "cache_creation_input_tokens": 0,
                                             "cache_read_input_tokens": 4}
    assert "".join(e["delta"].get("thinking", "") for e in events[:7] if e["type"] == "content_block_delta") == \
        "plan it"
    assert events[5]["delta"] == {"type": "signature_delta", "signature": ""}
    assert "".join(e["delta"]["text"] for e in events[7:11] if e["type"] == "content_block_delta") == "The answer"
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    assert events[-2]["usage"]["output_tokens"] == 4
    whole = message_from_output(outputs[-1], "m", "msg_1", starts_in_reasoning=True, clipped=False)
    assert whole["content"] == [{"type": "thinking", "thinking": "plan it", "signature": ""},
                                {"type": "text", "text": "The answer"}]


def test_stream_of_nothing_still_has_one_block_and_the_window_stop_reason():
    outputs = _output([""], "length")
    events = _events(MessageStream("msg_2", "m", starts_in_reasoning=False, clipped=True), outputs)
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "ping", "content_block_stop",
                                           "message_delta", "message_stop"]
    assert events[1]["content_block"] == {"type": "text", "text": ""}
    assert events[-2]["delta"]["stop_reason"] == "model_context_window_exceeded"
    whole = message_from_output(outputs[-1], "m", "msg_2", starts_in_reasoning=False, clipped=False)
    assert whole["content"] == [{"type": "text", "text": ""}] and whole["stop_reason"] == "max_tokens"


def test_output_config_format_becomes_a_json_schema_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = _body(messages=[{"role": "user", "content": "Q"}],
                 output_config={"effort": "low", "format": {"type": "json_schema", "schema": schema}})
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": schema, "strict": True}}
    assert "response_format" not in _body(messages=[{"role": "user", "content": "Q"}], output_config={"effort": "low"})
