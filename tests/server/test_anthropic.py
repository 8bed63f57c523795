"""Anthropic's Messages API through HTTP with the official `anthropic` client (sync and streaming).

The strongest check is equivalence: an Anthropic request and the OpenAI chat request it stands for render the
same prompt, so at temperature 0 the tiny model gives both the same tokens; then only the shapes differ.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from openr2.engine.usage import Usage
from tests.server._live import serve_tiny

QUESTION = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(base_url, server, secret): a key exists, so every request needs it."""
    with serve_tiny(tmp_path_factory) as (base_url, server):
        _, secret = server.ledger.create_key("anthropic-tests")
        yield base_url, server, secret


def _anthropic(live, key=None, base="/anthropic"):
    base_url, _, secret = live
    return anthropic.Anthropic(base_url=base_url + base, api_key=key or secret, max_retries=0)


def _openai(live):
    base_url, _, secret = live
    return openai.OpenAI(base_url=base_url + "/v1", api_key=secret, max_retries=0, _strict_response_validation=True)


def test_messages_match_the_chat_request_they_stand_for(live):
    system = "You add numbers."
    turns = [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "2"},
             {"role": "user", "content": [{"type": "text", "text": "And 2+2?"}]}]
    for thinking in ("enabled", "disabled"):
        extra = {"thinking": {"type": thinking, "budget_tokens": 1024}} if thinking == "enabled" else \
            {"thinking": {"type": "disabled"}}
        msg = _anthropic(live).messages.create(model="tiny", max_tokens=1100 if thinking == "enabled" else 10,
                                               system=[{"type": "text", "text": system}], messages=turns,
                                               extra_body={"temperature": 0}, stop_sequences=["\n\n\n"], **extra)
        chat = _openai(live).chat.completions.create(
            model="tiny", messages=[{"role": "system", "content": system}, *turns], temperature=0, stop=["\n\n\n"],
            max_tokens=msg.usage.output_tokens, extra_body={"thinking": {"type": thinking}})
        answer = chat.choices[0].message
        assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
        assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == chat.usage.prompt_tokens
        assert msg.usage.output_tokens == chat.usage.completion_tokens
        blocks = {b.type: b for b in msg.content}
        assert (blocks["thinking"].thinking if "thinking" in blocks else None) == answer.reasoning_content
        assert ("thinking" in blocks) == (thinking == "enabled")
        assert (blocks["text"].text if "text" in blocks else None) == (answer.content or None)
        assert msg.stop_reason in ("end_turn", "max_tokens", "model_context_window_exceeded")


def test_streaming_events_come_in_anthropics_order(live):
    base_url, _, secret = live
    body = {"model": "tiny", "max_tokens": 12, "messages": QUESTION}  # temperature is not in the SDK's signature
    with httpx.stream("POST", base_url + "/v1/messages", json={**body, "stream": True, "temperature": 0},
                      headers={"x-api-key": secret, "anthropic-version": "2023-06-01"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in r.read().decode().split("\n\n") if f]
    names = [f.split("\n")[0].removeprefix("event: ") for f in frames]
    data = [json.loads(f.split("\n")[1].removeprefix("data: ")) for f in frames]
    assert all(d["type"] == n for n, d in zip(names, data))
    assert names[:3] == ["message_start", "content_block_start", "ping"] and names[-2:] == ["message_delta",
                                                                                           "message_stop"]
    blocks = [i for i, n in enumerate(names) if n == "content_block_start"]
    for k, at in enumerate(blocks):  # each block: start, deltas, stop, with a dense index
        end = names.index("content_block_stop", at)
        assert {d["index"] for d in data[at:end + 1] if "index" in d} == {k}
        assert set(names[at + 1:end]) <= {"content_block_delta", "ping"}
    whole = _anthropic(live, base="").messages.create(**body, extra_body={"temperature": 0})
    with _anthropic(live).messages.stream(**body, extra_body={"temperature": 0}) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert (final.stop_reason, final.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)
    assert data[-2]["usage"]["output_tokens"] == whole.usage.output_tokens
    assert data[0]["message"]["usage"]["input_tokens"] + data[0]["message"]["usage"]["cache_read_input_tokens"] \
        == whole.usage.input_tokens + whole.usage.cache_read_input_tokens


def test_stop_sequences_and_prefill(live):
    client = _anthropic(live)
    kwargs = dict(model="deepseek-chat", max_tokens=12, messages=QUESTION,  # non-thinking
                  extra_body={"temperature": 0, "top_k": 1, "top_p": 1.0})
    text = client.messages.create(**kwargs).content[0].text
    k = next(i for i in range(1, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
    stop = text[k:k + 2]
    cut = client.messages.create(**kwargs, stop_sequences=["never seen", stop])
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    assert cut.content[0].text == text[:text.index(stop)]
    # a prefill is DeepSeek's prefix completion: the same prompt and the same continuation
    prefill = client.messages.create(**{**kwargs, "max_tokens": 6,
                                        "messages": [*QUESTION, {"role": "assistant", "content": "The answer"}]})
    prefix = _openai(live).chat.completions.create(
        model="deepseek-chat", max_tokens=6, temperature=0, top_p=1.0, extra_body={"top_k": 1},
        messages=[*QUESTION, {"role": "assistant", "content": "The answer", "prefix": True}])
    assert prefill.content[0].text == prefix.choices[0].message.content
    assert prefill.usage.input_tokens + prefill.usage.cache_read_input_tokens == prefix.usage.prompt_tokens


def test_keys_errors_and_billing_are_anthropics(live):
    base_url, server, secret = live
    with pytest.raises(anthropic.AuthenticationError) as err:
        _anthropic(live, key="sk-openr2-wrong").messages.create(model="tiny", max_tokens=2, messages=QUESTION)
    assert err.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                         "message": "Incorrect API key provided."}}
    r = httpx.post(base_url + "/v1/messages", json={"model": "tiny", "max_tokens": 2, "messages": QUESTION},
                   headers={"authorization": f"Bearer {secret}"})  # Bearer works as well
    assert r.status_code == 200 and r.json()["type"] == "message"
    client = _anthropic(live)
    for bad in ({"extra_body": {"temperature": 1.5}}, {"max_tokens": 0}, {"messages": []},
                {"output_config": {"format": {"type": "json_schema"}}},
                {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
                {"thinking": {"type": "enabled", "budget_tokens": 100}},
                {"thinking": {"type": "enabled", "budget_tokens": 2048}}):
        with pytest.raises(anthropic.BadRequestError) as err:
            client.messages.create(**{"model": "tiny", "max_tokens": 100, "messages": QUESTION, **bad})
        assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-sonnet-4-5", max_tokens=2, messages=QUESTION)
    r = httpx.post(base_url + "/anthropic/v1/messages", content=b"{oops", headers={"x-api-key": secret})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    before = server.ledger.usage_report(key_id=server.ledger.verify_key(secret))[0]
    msg = client.messages.create(model="tiny", max_tokens=4, messages=QUESTION)
    after = server.ledger.usage_report(key_id=server.ledger.verify_key(secret))[0]
    u = msg.usage
    assert after["cost_pico_usd"] - before["cost_pico_usd"] == server.prices.cost(
        Usage(u.input_tokens + u.cache_read_input_tokens, u.cache_read_input_tokens, u.output_tokens))
    key_id, poor = server.ledger.create_key("poor")
    server.ledger.set_balance(key_id, 1)
    with pytest.raises(anthropic.PaymentRequiredError) as err:
        _anthropic(live, key=poor).messages.create(model="tiny", max_tokens=4, messages=QUESTION)
    assert err.value.body["error"]["type"] == "billing_error"


def test_count_tokens_and_a_max_tokens_past_the_context(live):
    client = _anthropic(live)
    counted = client.messages.count_tokens(model="tiny", messages=QUESTION, system="Be brief.")
    msg = client.messages.create(model="tiny", max_tokens=3, messages=QUESTION, system="Be brief.")
    assert counted.input_tokens == msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    # Anthropic's clients ask for far more than a small model's context: cut to the room left, not a 400
    long = client.messages.create(model="tiny", max_tokens=20_000, messages=QUESTION, stop_sequences=["e"],
                                  output_config={"effort": "low"}, extra_body={"temperature": 0})
    assert long.stop_reason in ("stop_sequence", "end_turn", "model_context_window_exceeded")


def test_tools_reach_the_real_model(live):
    weather = {"name": "get_weather", "description": "Weather of a city",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    client = _anthropic(live)
    plain = client.messages.create(model="tiny", max_tokens=2, messages=QUESTION)
    msg = client.messages.create(model="tiny", max_tokens=2, messages=QUESTION, tools=[weather])
    assert msg.usage.input_tokens > plain.usage.input_tokens + 50  # described in the prompt
    assert (msg.stop_reason == "tool_use") == any(b.type == "tool_use" for b in msg.content)
