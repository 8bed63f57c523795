"""Wire format: our responses pass the official client's strict validation with DeepSeek's extras intact;
requests exactly as the openai SDK sends them parse and become SamplingParams; bad values are 400s that
name their parameter; a stream comes out as role, reasoning, content, finish and usage chunks."""

from __future__ import annotations

import json

import httpx2
import openai
import pytest
from openai._models import construct_type, validate_type  # strict: what _strict_response_validation runs
from openai.types import Completion as SDKCompletion
from openai.types import CompletionUsage
from openai.types import Model as SDKModel
from openai.types.chat import ChatCompletion as SDKChatCompletion
from openai.types.chat import ChatCompletionChunk as SDKChatCompletionChunk

from openr2.engine.engine import CompletionOutput, RequestOutput
from openr2.engine.sampling import TokenSample
from openr2.engine.usage import Usage
from openr2.server.errors import APIError
from openr2.server.outputs import (
    SSE_DONE,
    ChatStream,
    CompletionStream,
    chat_completion_from_output,
    completion_from_outputs,
    finish_reason,
    sse,
    usage_from_engine,
)
from openr2.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Model,
    ModelList,
)

VOCAB = {1: "<think>", 2: "</think>", 3: "Hi", 4: " there", 5: "é"}


def token_text(i: int) -> str:
    return VOCAB.get(i, f"<{i}>")


def strict(sdk_type, model):
    """Our model -> JSON -> the SDK's strict validation (extra fields allowed, Literals and types checked)."""
    return validate_type(type_=sdk_type, value=json.loads(model.model_dump_json()))


def sdk_client(handler) -> openai.OpenAI:
    """The official client over an in-process transport; handler(request) -> httpx2.Response."""
    return openai.OpenAI(base_url="http://test/v1", api_key="sk-test", max_retries=0,
                         _strict_response_validation=True,
                         http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))


def request_output(texts, reasons=("stop",), finished=True, logprobs=False, usage=None,
                   request_id="chatcmpl-1", prompt="Hello"):
    usage = usage or Usage(prompt_tokens=12, cached_prompt_tokens=8, completion_tokens=9, reasoning_tokens=4)
    outs = []
    for i, (text, reason) in enumerate(zip(texts, reasons)):
        ids = [3, 4]
        lps = [TokenSample(t, -0.5 * (k + 1), [(t, -0.5), (5, float("-inf"))]) for k, t in enumerate(ids)]
        outs.append(CompletionOutput(index=i, text=text, token_ids=ids, finish_reason=reason,
                                     logprobs=lps if logprobs else None, text_delta=text, token_ids_delta=ids))
    return RequestOutput(request_id, prompt, [7, 8, 9], outs, finished, usage)


# ---------------------------------------------------------------------------------------------- responses

def test_usage_has_openai_and_deepseek_fields():
    u = usage_from_engine(Usage(prompt_tokens=100, cached_prompt_tokens=64, completion_tokens=20, reasoning_tokens=7))
    parsed = strict(CompletionUsage, u)
    assert (parsed.prompt_tokens, parsed.completion_tokens, parsed.total_tokens) == (100, 20, 120)
    assert parsed.prompt_tokens_details.cached_tokens == 64
    assert parsed.completion_tokens_details.reasoning_tokens == 7
    assert parsed.prompt_cache_hit_tokens == 64 and parsed.prompt_cache_miss_tokens == 36  # extras survive
    total = usage_from_engine([Usage(10, 0, 1, 0), Usage(5, 5, 2, 1)])  # one per prompt, summed
    assert total.model_dump()["prompt_cache_miss_tokens"] == 10 and total.total_tokens == 18
    zero = usage_from_engine(Usage(3, 0, 0, 0)).model_dump()  # cache fields are always present
    assert zero["prompt_cache_hit_tokens"] == 0 and zero["completion_tokens_details"] == {"reasoning_tokens": 0}


def test_finish_reason_mapping():
    assert [finish_reason(r) for r in ("stop", "length", "abort", None)] == ["stop", "length", "length", None]


def test_chat_completion_passes_strict_validation_with_reasoning():
    out = request_output(["<think>\nplan it\n</think>\n\nThe answer.", "cut sho"], reasons=("stop", "abort"),
                         logprobs=True)
    resp = chat_completion_from_output(out, "openr2-demo", 1700000000, token_text=token_text)
    parsed = strict(SDKChatCompletion, resp)
    assert parsed.id == "chatcmpl-1" and parsed.object == "chat.completion" and parsed.created == 1700000000
    first, second = parsed.choices
    assert first.message.content == "The answer." and first.message.reasoning_content == "plan it"
    assert first.finish_reason == "stop" and second.finish_reason == "length"  # abort is not a valid Literal
    assert second.message.content == "cut sho" and second.message.reasoning_content is None
    lp = first.logprobs.content
    assert [t.token for t in lp] == ["Hi", " there"] and lp[0].logprob == -0.5
    assert lp[0].top_logprobs[1].logprob == -9999.0  # -inf is not JSON
    assert parsed.usage.prompt_cache_hit_tokens == 8 and parsed.usage.completion_tokens_details.reasoning_tokens == 4


def test_chat_completion_starting_in_reasoning_and_without_parsing():
    out = request_output(["think more\n</think>\n\nDone"])
    msg = strict(SDKChatCompletion, chat_completion_from_output(out, "m", 1, starts_in_reasoning=True)).choices[0]
    assert (msg.message.reasoning_content, msg.message.content) == ("think more", "Done")
    raw = chat_completion_from_output(out, "m", 1, parse_reasoning=False, id="chatcmpl-x")
    assert raw.id == "chatcmpl-x" and raw.choices[0].message.content == out.outputs[0].text


def test_completion_and_models_pass_strict_validation():
    outs = [request_output(["Hi there"], logprobs=True, prompt="Say:"),
            request_output(["x"], reasons=("length",), usage=Usage(3, 0, 1, 0), prompt=None)]
    resp = completion_from_outputs(outs, "m", 5, id="cmpl-1", echo=True, token_text=token_text)
    parsed = strict(SDKCompletion, resp)
    assert [c.text for c in parsed.choices] == ["Say:Hi there", "<7><8><9>x"]  # id prompts echo decoded
    assert [c.finish_reason for c in parsed.choices] == ["stop", "length"]
    lp = parsed.choices[0].logprobs
    assert lp.tokens == ["Hi", " there"] and lp.text_offset == [4, 6] and lp.top_logprobs[0]["Hi"] == -0.5
    assert parsed.usage.prompt_tokens == 15 and parsed.usage.prompt_cache_hit_tokens == 8
    models = ModelList(data=[Model(id="openr2-demo", created=1, max_model_len=4096)])
    for m in json.loads(models.model_dump_json())["data"]:
        assert validate_type(type_=SDKModel, value=m).owned_by == "openr2"


def test_official_client_reads_our_responses():
    def handler(request):
        path = request.url.path
        if path.endswith("/models"):
            return httpx2.Response(200, json=ModelList(data=[Model(id="m", created=1)]).model_dump())
        body = chat_completion_from_output(request_output(["<think>r</think>a"]), "m", 1)
        return httpx2.Response(200, json=json.loads(body.model_dump_json()))

    client = sdk_client(handler)
    assert [m.id for m in client.models.list()] == ["m"]
    resp = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == "a" and resp.choices[0].message.reasoning_content == "r"
    assert resp.usage.prompt_cache_miss_tokens == 4


# ---------------------------------------------------------------------------------------------- streaming

def _steps(deltas, final_reason="stop"):
    """Engine outputs for one choice: each step adds one token and a text delta; the last one finishes."""
    text, outs = "", []
    for k, delta in enumerate(deltas):
        text += delta
        last = k == len(deltas) - 1
        lps = [TokenSample(k, -1.0 * k, [])] * (k + 1)  # a growing list, as the engine keeps it
        out = CompletionOutput(index=0, text=text, token_ids=list(range(k + 1)), logprobs=lps,
                               finish_reason=final_reason if last else None, text_delta=delta, token_ids_delta=[k])
        outs.append(RequestOutput("chatcmpl-s", None, [1], [out], last, Usage(1, 0, k + 1, 3 if last else 0)))
    return outs


def test_chat_stream_chunk_sequence():
    stream = ChatStream("chatcmpl-s", "m", 42, token_text=token_text)
    steps = _steps(["<thi", "nk>\nstep", " one\n</th", "ink>\n\nThe", " answer", ""])
    chunks = stream.start() + [c for s in steps for c in stream.feed(s)] + [stream.usage_chunk(steps[-1].usage)]
    parsed = [strict(SDKChatCompletionChunk, c) for c in chunks]
    assert {p.id for p in parsed} == {"chatcmpl-s"} and {p.created for p in parsed} == {42}
    wire = [json.loads(c.model_dump_json()) for c in chunks]
    assert wire[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "reasoning_content": None}
    deltas = [w["choices"][0]["delta"] for w in wire[1:-1]]
    assert deltas == [{"content": None, "reasoning_content": "step"}, {"content": None, "reasoning_content": " one"},
                      {"content": "The", "reasoning_content": None}, {"content": " answer", "reasoning_content": None},
                      {"content": "", "reasoning_content": None}]  # the finish chunk: nothing new, no null content
    assert "".join(p.choices[0].delta.reasoning_content or "" for p in parsed[1:-1]) == "step one"
    assert "".join(p.choices[0].delta.content or "" for p in parsed[1:-1]) == "The answer"
    assert [p.choices[0].finish_reason if p.choices else "-" for p in parsed] == [None] * 5 + ["stop", "-"]
    # logprobs are never lost: tokens whose text was held back ride on the next chunk
    sent = [lp.logprob for p in parsed[1:-1] if p.choices[0].logprobs for lp in p.choices[0].logprobs.content]
    assert sent == [-0.0, -1.0, -2.0, -3.0, -4.0, -5.0]
    last = parsed[-1]
    assert last.choices == [] and last.usage.completion_tokens == 6 and last.usage.prompt_cache_miss_tokens == 1
    assert last.usage.completion_tokens_details.reasoning_tokens == 3
    assert all(w["usage"] is None for w in wire[:-1])


def test_official_client_streams_reasoning_and_usage():
    def handler(request):
        body = json.loads(request.content)
        assert body["stream"] is True
        stream = ChatStream("chatcmpl-s", body["model"], 42, starts_in_reasoning=True)
        reason = "length" if "stream_options" in body else "stop"  # .stream() raises on "length"
        steps = _steps(["plan", "</think>", "Hello", "!"], final_reason=reason)
        events = [sse(c) for c in stream.start() + [c for s in steps for c in stream.feed(s)]]
        events += [": keep-alive\n\n", sse(stream.usage_chunk(steps[-1].usage)), SSE_DONE]
        return httpx2.Response(200, content="".join(events).encode(), headers={"content-type": "text/event-stream"})

    client = sdk_client(handler)
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert (reasoning, text) == ("plan", "Hello!")
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.total_tokens == 5
    with client.chat.completions.stream(model="m", messages=[{"role": "user", "content": "hi"}]) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.content == "Hello!" and final.choices[0].finish_reason == "stop"


WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def _tool_parser():
    from openr2.tool_calls import V3, ToolCallParser

    return ToolCallParser(V3, ["weather"])


def test_tool_calls_non_streamed_pass_strict_validation_and_never_come_empty():
    from openr2.tool_calls import V3

    calls = V3.calls_text([("weather", '{"city": "Paris"}'), ("weather", '{"city": "Oslo"}')])
    out = request_output([f"<think>\ncall it {calls}\n</think>\n\nChecking." + calls, "No tools here.",
                          calls[:-40]], reasons=("stop", "stop", "length"))
    resp = chat_completion_from_output(out, "m", 1, tool_parser=_tool_parser)
    parsed = strict(SDKChatCompletion, resp)
    first, plain, cut = parsed.choices
    assert first.finish_reason == "tool_calls" and first.message.content == "Checking."
    assert first.message.reasoning_content == f"call it {calls}"  # calls in the reasoning stay reasoning
    assert [(c.function.name, json.loads(c.function.arguments)) for c in first.message.tool_calls] == \
        [("weather", {"city": "Paris"}), ("weather", {"city": "Oslo"})]
    assert len({c.id for c in first.message.tool_calls}) == 2 and all(c.type == "function"
                                                                       for c in first.message.tool_calls)
    assert plain.finish_reason == "stop" and plain.message.tool_calls is None
    assert "tool_calls" not in json.loads(resp.model_dump_json())["choices"][1]["message"]
    assert cut.finish_reason == "length" and len(cut.message.tool_calls) == 1  # the complete call, cut after it
    only_text = chat_completion_from_output(request_output([calls.replace("weather", "nope")]), "m", 1,
                                            tool_parser=_tool_parser)
    assert only_text.choices[0].finish_reason == "stop" and only_text.choices[0].message.tool_calls is None


def test_official_client_streams_tool_calls():
    from openr2.tool_calls import V3

    calls = V3.calls_text([("weather", '{"city": "Paris"}'), ("weather", '{"city": "Oslo"}')])

    def handler(request):
        stream = ChatStream("chatcmpl-t", "m", 42, starts_in_reasoning=True, tool_parser=_tool_parser)
        first = calls.index("<｜tool▁call▁end｜>") + len("<｜tool▁call▁end｜>")  # a call per delta
        pieces = ["plan", "</think>", "Let me check.", calls[:30], calls[30:first], calls[first:], ""]
        events = [sse(c) for c in stream.start() + [c for s in _steps(pieces) for c in stream.feed(s)]]
        wire = [json.loads(e.removeprefix("data: ")) for e in events]
        deltas = [w["choices"][0]["delta"] for w in wire if w["choices"][0]["delta"].get("tool_calls")]
        assert [d["tool_calls"][0]["index"] for d in deltas] == [0, 1] and deltas[0]["content"] is None
        return httpx2.Response(200, content="".join([*events, SSE_DONE]).encode(),
                               headers={"content-type": "text/event-stream"})

    client = sdk_client(handler)
    with client.chat.completions.stream(model="m", messages=[{"role": "user", "content": "hi"}],
                                        tools=[WEATHER_TOOL]) as s:
        final = s.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    assert [json.loads(c.function.arguments)["city"] for c in choice.message.tool_calls] == ["Paris", "Oslo"]


def test_completion_stream():
    stream = CompletionStream("cmpl-s", "m", 3, n=1, echo=True, token_text=token_text)
    steps = _steps(["Hi", " there", ""])
    for s in steps:
        s.prompt = "Say:"
    chunks = [c for s in steps for c in stream.feed(s)] + [stream.usage_chunk([steps[-1].usage])]
    # The SDK types every completions chunk as Completion, whose finish_reason is not Optional, so no
    # server (OpenAI included) passes strict mode mid-stream; the default client parses them leniently.
    parsed = [construct_type(type_=SDKCompletion, value=json.loads(c.model_dump_json())) for c in chunks[:-2]]
    parsed += [strict(SDKCompletion, c) for c in chunks[-2:]]
    assert [p.choices[0].text for p in parsed[:-1]] == ["Say:Hi", " there", ""]
    assert [p.choices[0].finish_reason for p in parsed[:-1]] == [None, None, "stop"]
    assert [p.choices[0].logprobs.text_offset for p in parsed[:-1]] == [[4], [6], [12]]
    assert parsed[-1].choices == [] and parsed[-1].usage.completion_tokens == 3


def test_completion_stream_ends_each_choice_once():
    """With n > 1 a finished choice is still in the engine's later outputs: its finish_reason is sent once (a
    choice the content policy ended carries the rule beside it)."""
    from openr2.server.protocol import ContentFilter

    stream = CompletionStream("cmpl-n", "m", 3, n=2)
    refused = ContentFilter(rule="r", on="answer")
    first = [CompletionOutput(index=0, text="A", text_delta="A", finish_reason="content_filter", stop_reason=refused),
             CompletionOutput(index=1, text="B", text_delta="B")]
    second = [CompletionOutput(index=0, text="A", finish_reason="content_filter", stop_reason=refused),
              CompletionOutput(index=1, text="BC", text_delta="C", finish_reason="stop")]
    third = [CompletionOutput(index=0, text="A", finish_reason="content_filter", stop_reason=refused),
             CompletionOutput(index=1, text="BC", finish_reason="stop")]
    chunks = [c for outs in (first, second, third)
              for c in stream.feed(RequestOutput("r", None, [1], outs, outs is third, Usage(1, 0, 3)))]
    sent = [json.loads(c.model_dump_json())["choices"][0] for c in chunks]
    assert [(c["index"], c["text"], c["finish_reason"], c.get("content_filter")) for c in sent] == [
        (0, "A", "content_filter", {"rule": "r", "on": "answer"}), (1, "B", None, None), (1, "C", "stop", None)]


# ---------------------------------------------------------------------------------------------- requests

def captured(call) -> dict:
    """The JSON body the official client sends for `call(client)`."""
    seen = {}

    def handler(request):
        seen["body"] = json.loads(request.content)
        return httpx2.Response(400, json={"error": {"message": "captured", "type": "x", "param": None, "code": None}})

    with pytest.raises(openai.BadRequestError):
        call(sdk_client(handler))
    return seen["body"]


def test_sdk_chat_payload_parses():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Really."}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "earlier", "reasoning_content": "old thoughts"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "user", "content": "go"},
    ]
    body = captured(lambda c: c.chat.completions.create(
        model="openr2-demo", messages=messages, max_completion_tokens=64, max_tokens=100, stop=["\n\n", "END"],
        seed=7, n=2, temperature=0.6, top_p=0.9, presence_penalty=0.5, frequency_penalty=-0.5, logprobs=True,
        top_logprobs=3, user="u1", response_format={"type": "text"}, metadata={"k": "v"}, store=False,
        parallel_tool_calls=False, reasoning_effort="low", service_tier="auto",
        stream=True, stream_options={"include_usage": True, "include_obfuscation": False},
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "thinking": {"type": "disabled"},
                    "some_future_field": {"x": 1}}))
    req = ChatCompletionRequest.parse(body)
    assert req.include_usage and req.thinking_enabled is False and req.assistant_prefix is None
    tm = req.template_messages()
    assert tm[3] == {"role": "assistant", "content": "earlier"}  # DeepSeek drops earlier turns' reasoning
    assert tm[1]["content"] == [{"type": "text", "text": "Really."}] and "prefix" not in tm[0]
    p = req.to_sampling_params(default_max_tokens=1024, max_model_len=4096, num_prompt_tokens=50)
    assert (p.max_tokens, p.n, p.seed, p.temperature, p.top_p, p.top_k, p.min_p) == (64, 2, 7, 0.6, 0.9, 20, 0.05)
    assert (p.stop, p.logprobs, p.repetition_penalty, p.presence_penalty) == (["\n\n", "END"], 3, 1.1, 0.5)


def test_sdk_completion_payloads_parse():
    body = captured(lambda c: c.completions.create(model="m", prompt=[[1, 2, 3], [4]], max_tokens=5, echo=True,
                                                   logit_bias={}, best_of=1, stop="\n", suffix=""))
    req = CompletionRequest.parse(body)
    assert req.prompts() == [[1, 2, 3], [4]] and req.echo
    p = req.to_sampling_params(16, 2048)
    assert (p.max_tokens, p.stop, p.logprobs) == (5, ["\n"], None)
    for prompt, expected in [("x", ["x"]), (["a", "b"], ["a", "b"]), ([5, 6], [[5, 6]])]:
        assert CompletionRequest.parse({"model": "m", "prompt": prompt}).prompts() == expected
    req = CompletionRequest.parse(captured(lambda c: c.completions.create(model="m", prompt="p", logprobs=2)))
    assert req.to_sampling_params(None, 100).logprobs == 2


def test_max_tokens_rules():
    def params(extra, default=256, max_len=1000, prompt=None):
        req = ChatCompletionRequest.parse({"model": "m", "messages": [{"role": "user", "content": "x"}], **extra})
        return req.to_sampling_params(default, max_len, prompt).max_tokens

    assert params({"max_tokens": 50, "max_completion_tokens": 30}) == 30  # the smaller wins, either order
    assert params({"max_tokens": 20, "max_completion_tokens": 30}) == 20
    assert params({"max_completion_tokens": 30}) == 30
    assert params({}) == 256 and params({}, default=None) is None
    assert params({}, prompt=900) == 100  # the default is clipped to the room left
    assert params({}, default=None, prompt=900) == 100
    assert params({"max_tokens": 100}, prompt=900) == 100
    with pytest.raises(APIError) as e:
        params({"max_tokens": 101}, prompt=900)
    assert (e.value.status, e.value.code, e.value.param) == (400, "context_length_exceeded", "messages")
    assert "1001 tokens" in e.value.message
    with pytest.raises(APIError) as e:
        params({}, prompt=1000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(APIError) as e:
        params({"max_completion_tokens": 5000})
    assert e.value.param == "max_completion_tokens"
    with pytest.raises(APIError) as e:
        params({"max_completion_tokens": 0})
    assert e.value.param == "max_completion_tokens"
    with pytest.raises(APIError) as e:
        CompletionRequest.parse({"model": "m", "prompt": "x", "max_tokens": 10}).to_sampling_params(16, 20, 15)
    assert e.value.param == "prompt"


def test_prefix_completion_and_thinking_switches():
    msgs = [{"role": "user", "content": "code"}, {"role": "assistant", "content": "```python\n", "prefix": True}]
    req = ChatCompletionRequest.parse({"model": "m", "messages": msgs, "stop": "```",
                                       "chat_template_kwargs": {"thinking": True}})
    assert req.assistant_prefix == "```python\n" and req.template_messages() == [msgs[0]]
    assert req.thinking_enabled is True
    plain = ChatCompletionRequest.parse({"model": "m", "messages": msgs[:1], "tools": [{"type": "function"}],
                                         "tool_choice": "none", "response_format": None, "logprobs": None})
    assert plain.thinking_enabled is None and plain.to_sampling_params(8, 64).logprobs is None


@pytest.mark.parametrize("extra,choice", [
    ({}, (None, None)),
    ({"reasoning_effort": "none"}, (False, "reasoning_effort")),
    ({"reasoning_effort": "low"}, (True, "reasoning_effort")),
    ({"reasoning_effort": "max"}, (True, "reasoning_effort")),
    ({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}}, (False, "chat_template_kwargs")),
    ({"reasoning_effort": "none", "thinking": {"type": "enabled"}, "chat_template_kwargs": {"thinking": False}},
     (True, "thinking")),
])
def test_thinking_choice_and_the_parameter_that_made_it(extra, choice):
    assert ChatCompletionRequest.parse({**CHAT, **extra}).thinking_choice() == choice


def test_reasoning_content_reaches_the_template_only_on_the_current_tool_turns():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "old tool plan"},
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "old answer plan"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "current plan"},
        {"role": "tool", "tool_call_id": "c1", "content": "2"},
    ]
    tm = ChatCompletionRequest.parse({**CHAT, "messages": msgs}).template_messages()
    assert [m.get("reasoning_content") for m in tm] == [None, None, None, None, None, "current plan", None]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"model": None}, "model"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "a", "prefix": True}, {"role": "user", "content": "b"}]},
     "messages[0].prefix"),
    ({"n": "2"}, "n"),
    ({"temperature": True}, "temperature"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": ["s"] * 17}, "stop"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}}, "response_format"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]}, "tools[0].function.strict"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "any"}, "tool_choice"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"audio": {"voice": "x"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"thinking": {"type": "maybe"}}, "thinking"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"reasoning_effort": 3}, "reasoning_effort"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
]
BAD_SAMPLING = [
    ({"top_p": 1.5}, "top_p"), ({"temperature": -1}, "temperature"), ({"n": 0}, "n"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"max_tokens": -1}, "max_tokens"), ({"repetition_penalty": 0}, "repetition_penalty"), ({"top_k": -2}, "top_k"),
]


@pytest.mark.parametrize("patch,param", BAD_CHAT)
def test_bad_chat_requests_name_the_param(patch, param):
    with pytest.raises(APIError) as e:
        ChatCompletionRequest.parse({**CHAT, **patch})
    assert (e.value.status, e.value.param, e.value.type) == (400, param, "invalid_request_error")
    assert e.value.message and "Traceback" not in e.value.message


@pytest.mark.parametrize("patch,param", BAD_SAMPLING)
def test_bad_sampling_values_name_the_param(patch, param):
    req = ChatCompletionRequest.parse({**CHAT, **patch})  # types are fine; SamplingParams judges the range
    with pytest.raises(APIError) as e:
        req.to_sampling_params(16, 4096)
    assert (e.value.status, e.value.param) == (400, param) and e.value.message.startswith(param + " ")


@pytest.mark.parametrize("patch,param", [
    ({"prompt": []}, "prompt"), ({"prompt": [[1], "a"]}, "prompt"), ({"prompt": [True, 2]}, "prompt"),
    ({"prompt": [[]]}, "prompt"), ({"suffix": "tail", "prompt": [1, 2]}, "suffix"),
    ({"suffix": "tail", "echo": True}, "echo"), ({"best_of": 3}, "best_of"),
    ({"echo": True, "logprobs": 1}, "echo"), ({"prompt": None}, "prompt"),
])
def test_bad_completion_requests_name_the_param(patch, param):
    with pytest.raises(APIError) as e:
        CompletionRequest.parse({"model": "m", "prompt": "x", **patch})
    assert (e.value.status, e.value.param) == (400, param)


def test_generation_config_defaults_fill_what_the_request_leaves_out(tmp_path):
    from openr2.engine.sampling import generation_defaults
    from openr2.server.protocol import ChatCompletionRequest

    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "top_p": 0.9, "eos_token_id": 1}))
    defaults = generation_defaults(str(tmp_path))
    assert defaults == {"temperature": 0.0, "top_p": 0.9}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_k": 20}))
    defaults = generation_defaults(str(tmp_path))
    assert defaults == {"temperature": 0.6, "top_k": 20}
    msgs = [{"role": "user", "content": "hi"}]
    params = ChatCompletionRequest.parse({"model": "m", "messages": msgs}).to_sampling_params(8, 100, 3, defaults)
    assert (params.temperature, params.top_k) == (0.6, 20)
    params = ChatCompletionRequest.parse({"model": "m", "messages": msgs, "temperature": 1.2}).to_sampling_params(
        8, 100, 3, defaults)
    assert (params.temperature, params.top_k) == (1.2, 20)
    assert generation_defaults(str(tmp_path / "nowhere")) == {}
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="generation_config.json"):
        generation_defaults(str(tmp_path))
