"""Anthropic's Messages API on the wire: the request, its translation into a chat request, and the responses.

Owns `MessagesRequest` (what a client of the official `anthropic` SDK sends to POST /v1/messages, validated so
that a bad value is a 400 naming it), `to_chat_body` (the same request as an OpenAI chat body, so one path
renders, meters and bills both APIs), and the builders of Anthropic's response: `message_from_output` and
`MessageStream` (the event sequence of a streamed message). No HTTP, no engine calls (anthropic.py).

How Anthropic's fields map onto ours:
  * `system` (a string or text blocks) is the system message; `messages` alternate user and assistant with
    a string or content blocks: `text`; `thinking` on assistant turns (-> reasoning_content, which the chat
    path keeps only on the current tool-calling turns, as DeepSeek does); `tool_use` (-> tool_calls) and
    `tool_result` (-> role "tool" messages); `redacted_thinking` is dropped. A last assistant message is a
    prefill, which the answer continues (DeepSeek's prefix completion).
  * `thinking` {"type": "enabled", "budget_tokens"} / {"type": "disabled"} choose the template's thinking
    mode; "adaptive" leaves the model's default. `budget_tokens` follows Anthropic's rules (at least 1024,
    under max_tokens) but only `max_tokens` caps generation (thinking included): there is no separate cap.
  * `max_tokens` is cut to the room the context leaves (stop_reason `model_context_window_exceeded` when that
    cut ends the answer); `stop_sequences`, `temperature` (0..1), `top_p`, `top_k` as the chat path takes them.
  * `tools` / `tool_choice` become OpenAI's `tools` / `tool_choice` (auto, none; any -> required and a named
    tool, both kept by constrained decoding); calls come back as `tool_use` blocks, stop_reason "tool_use".
  * `output_config.format` ({"type": "json_schema", "schema": ...}, structured output) becomes the chat
    path's `response_format` json_schema: the text is constrained to the schema.
  * `output_config.effort`, `metadata`, `service_tier`, `cache_control` and unknown fields are accepted and
    ignored. The current SDK no longer types
    `temperature`, `top_p` and `top_k`; they still work (as extra_body from the SDK).
Usage follows Anthropic's meaning: `input_tokens` excludes the prompt tokens read from the prefix cache,
which are `cache_read_input_tokens` (input_tokens + cache_read_input_tokens = the whole prompt).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from openr2.chat_format import ReasoningParser
from openr2.server.errors import ParamError, bad_request, from_validation_errors
from openr2.server.protocol import MAX_STOP_SEQUENCES, _Strict, random_id

MIN_THINKING_BUDGET = 1024  # Anthropic's lower bound for budget_tokens


class ThinkingConfig(_Strict):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None
    display: Literal["summarized", "omitted"] | None = None


class MessageParam(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[dict]


class MessagesRequest(_Strict):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[dict] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = None
    top_k: int | None = None
    thinking: ThinkingConfig | None = None
    tools: list[dict] | None = None
    tool_choice: dict | None = None
    output_config: dict | None = None  # {"effort": ...} is accepted (no effort levels here); "format" is used
    metadata: dict | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v):
        if v is not None and (not all(v) or len(v) > MAX_STOP_SEQUENCES):
            raise ValueError(f"expected at most {MAX_STOP_SEQUENCES} non-empty strings")
        return v or None

    @field_validator("output_config")
    @classmethod
    def _output_config(cls, v):
        fmt = (v or {}).get("format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "json_schema"
                                or not isinstance(fmt.get("schema"), dict)):
            raise ParamError("output_config.format", "output_config.format must be {'type': 'json_schema', "
                                                     "'schema': {...}}.")
        return v

    @model_validator(mode="after")
    def _check(self):
        t = self.thinking
        if t is not None and t.type == "enabled":
            if t.budget_tokens is None or t.budget_tokens < MIN_THINKING_BUDGET:
                raise ParamError("thinking.budget_tokens", f"thinking.budget_tokens must be at least "
                                                           f"{MIN_THINKING_BUDGET}.")
            if t.budget_tokens >= self.max_tokens:
                raise ParamError("thinking.budget_tokens", "thinking.budget_tokens must be less than max_tokens.")
        return self

    @classmethod
    def parse(cls, data: Any) -> MessagesRequest:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise from_validation_errors(e.errors()) from None


# ---------------------------------------------------------------------------------------------- requests

def _text(block: dict, where: str) -> str:
    if not isinstance(block.get("text"), str):
        raise ParamError(where, f"{where}: a text block needs a string 'text'.")
    return block["text"]


def _blocks(content: str | list[dict]) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _tool_result(block: dict, where: str) -> dict:
    content = block.get("content", "")
    if isinstance(content, list):
        if not all(isinstance(b, dict) for b in content):
            raise ParamError(where, f"{where}: tool_result content is a string or a list of blocks.")
        content = "\n".join(_text(b, f"{where}.content[{k}]") for k, b in enumerate(content)
                            if b.get("type") == "text")
    if not isinstance(content, str) or not isinstance(block.get("tool_use_id"), str):
        raise ParamError(where, f"{where}: a tool_result needs a string tool_use_id and text content.")
    return {"role": "tool", "tool_call_id": block["tool_use_id"],
            "content": ("Error: " if block.get("is_error") else "") + content}


def _user_messages(blocks: list[dict], where: str) -> list[dict]:
    """One user turn -> its tool results (as role "tool" messages), then its text as a user message."""
    tools, texts = [], []
    for j, block in enumerate(blocks):
        kind, at = block.get("type"), f"{where}[{j}]"
        if kind == "text":
            texts.append(_text(block, at))
        elif kind == "tool_result":
            tools.append(_tool_result(block, at))
        else:
            raise ParamError(at, f"{at}: content blocks of type {kind!r} are not supported; "
                                 f"user turns take text and tool_result blocks.")
    return tools + ([{"role": "user", "content": "\n".join(texts)}] if texts or not tools else [])


def _assistant_message(blocks: list[dict], where: str) -> dict:
    text, reasoning, calls = [], [], []
    for j, block in enumerate(blocks):
        kind, at = block.get("type"), f"{where}[{j}]"
        if kind == "text":
            text.append(_text(block, at))
        elif kind == "thinking":
            if not isinstance(block.get("thinking", ""), str):
                raise ParamError(at, f"{at}: a thinking block needs a string 'thinking'.")
            reasoning.append(block.get("thinking", ""))
        elif kind == "tool_use":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict) \
                    or not isinstance(block.get("id", ""), str):
                raise ParamError(at, f"{at}: a tool_use needs a string id and name and an object input.")
            calls.append({"id": block.get("id") or random_id("toolu_"), "type": "function",
                          "function": {"name": block["name"],
                                       "arguments": json.dumps(block.get("input", {}), ensure_ascii=False)}})
        elif kind != "redacted_thinking":
            raise ParamError(at, f"{at}: content blocks of type {kind!r} are not supported in assistant turns.")
    message: dict = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _system_text(system: str | list[dict] | None) -> str | None:
    if system is None or isinstance(system, str):
        return system
    return "\n".join(_text(b, f"system[{k}]") for k, b in enumerate(system))


def _tools(tools: list[dict]) -> list[dict]:
    out = []
    for k, tool in enumerate(tools):
        if not isinstance(tool.get("name"), str):
            raise ParamError(f"tools[{k}].name", f"tools[{k}] needs a name.")
        fn = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: dict | None):
    kind = (choice or {}).get("type", "auto")
    if kind not in ("auto", "any", "none", "tool"):
        raise ParamError("tool_choice", "tool_choice.type must be one of auto, any, tool, none.")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return {"auto": "auto", "any": "required", "none": "none"}[kind]


def to_chat_body(req: MessagesRequest) -> dict:
    """The request as an OpenAI chat body for Server.prepare_chat (see the module docstring); a block it
    cannot take is a 400 naming it."""
    try:
        return _chat_body(req)
    except ParamError as e:
        raise bad_request(str(e), e.param) from None


def _chat_body(req: MessagesRequest) -> dict:
    messages = []
    system = _system_text(req.system)
    if system:
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        where = f"messages[{i}].content"
        if m.role == "user":
            messages += _user_messages(_blocks(m.content), where)
        else:
            messages.append(_assistant_message(_blocks(m.content), where))
    last = messages[-1]
    if last["role"] == "assistant" and not last.get("tool_calls"):
        last["prefix"] = True  # a prefill: the answer continues it
        last.pop("reasoning_content", None)
    body = {"model": req.model, "messages": messages, "max_tokens": req.max_tokens, "stop": req.stop_sequences,
            "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k}
    if req.thinking is not None and req.thinking.type != "adaptive":
        body["thinking"] = {"type": req.thinking.type}
    fmt = (req.output_config or {}).get("format")
    if fmt is not None:  # structured output: the chat path's json_schema (constrained decoding)
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}
    if req.tools:
        body["tools"], body["tool_choice"] = _tools(req.tools), _tool_choice(req.tool_choice)
        if (req.tool_choice or {}).get("disable_parallel_tool_use"):
            body["parallel_tool_calls"] = False
    return {k: v for k, v in body.items() if v is not None}


# ---------------------------------------------------------------------------------------------- responses

def usage(engine_usage) -> dict:
    cached = engine_usage.cached_prompt_tokens
    return {"input_tokens": engine_usage.prompt_tokens - cached, "output_tokens": engine_usage.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def stop_reason(out, clipped: bool, num_calls: int = 0) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished CompletionOutput; clipped: max_tokens was cut to the
    context, so running out of it means the context window is full; "tool_use" only with calls made; "refusal"
    when the operator's policy ended it (policy.py), Anthropic's reason for a response its classifiers stopped."""
    if out.finish_reason == "content_filter":
        return "refusal", None
    if out.finish_reason == "stop":
        if isinstance(out.stop_reason, str):
            return "stop_sequence", out.stop_reason
        return ("tool_use" if num_calls else "end_turn"), None
    return ("model_context_window_exceeded" if clipped and out.finish_reason == "length" else "max_tokens"), None


def _tool_use(call) -> dict:
    return {"type": "tool_use", "id": random_id("toolu_"), "name": call.name, "input": json.loads(call.arguments)}


def message_from_output(output, model: str, msg_id: str, *, starts_in_reasoning: bool, clipped: bool,
                        omit_thinking: bool = False, tool_parser=None) -> dict:
    """A finished RequestOutput -> Anthropic's Message (tool_parser: as outputs.chat_completion_from_output's)."""
    out = output.outputs[0]
    reasoning, text = ReasoningParser(starts_in_reasoning).parse(out.text)
    calls = []
    if tool_parser is not None:
        text, calls = tool_parser().parse(text)
    content = []
    if reasoning is not None:
        content.append({"type": "thinking", "thinking": "" if omit_thinking else reasoning, "signature": ""})
    if text or not (content or calls):
        content.append({"type": "text", "text": text})
    content += [_tool_use(c) for c in calls]
    reason, sequence = stop_reason(out, clipped, len(calls))
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": sequence, **_content_filter(out), "usage": usage(output.usage)}


def _content_filter(out) -> dict:
    """{"content_filter": {"rule", "on"}} when the operator's policy ended the message (as on OpenAI's choices)."""
    return {"content_filter": out.stop_reason.model_dump()} if out.finish_reason == "content_filter" else {}


def event(kind: str, data: dict) -> str:
    """One server-sent event as Anthropic frames them: a named event and its JSON."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


class MessageStream:
    """The events of one streamed message, in Anthropic's order: message_start (`start`); per block a
    content_block_start (a ping after the first), its deltas and a content_block_stop (`feed`: thinking,
    then text, then tool_use blocks, each call whole); then message_delta with stop_reason and usage, and
    message_stop (`finish`)."""

    def __init__(self, msg_id: str, model: str, *, starts_in_reasoning: bool, clipped: bool,
                 omit_thinking: bool = False, tool_parser=None):
        self.id, self.model, self.clipped, self.omit_thinking = msg_id, model, clipped, omit_thinking
        self.starts_in_reasoning, self.tool_parser = starts_in_reasoning, tool_parser
        self.parser = ReasoningParser(starts_in_reasoning)
        self.tools = tool_parser() if tool_parser is not None else None
        self.num_calls = 0
        self.index = -1  # of the open block
        self.kind: str | None = None  # "thinking", "text" or "tool_use", the open block's

    def message(self, last) -> dict:
        """The same message whole, for a request that was not streamed (message_from_output)."""
        return message_from_output(last, self.model, self.id, starts_in_reasoning=self.starts_in_reasoning,
                                   clipped=self.clipped, omit_thinking=self.omit_thinking, tool_parser=self.tool_parser)

    def start(self, first) -> list[str]:
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": usage(first.usage)}
        return [event("message_start", {"message": message})]

    def _open(self, kind: str, block: dict | None = None) -> list[str]:
        events = self._close()
        self.index, self.kind = self.index + 1, kind
        block = block or ({"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else
                          {"type": "text", "text": ""})
        events.append(event("content_block_start", {"index": self.index, "content_block": block}))
        if self.index == 0:
            events.append(event("ping", {}))
        return events

    def _close(self) -> list[str]:
        if self.kind is None:
            return []
        events = [event("content_block_delta", {"index": self.index, "delta": {"type": "signature_delta",
                                                                                "signature": ""}})] \
            if self.kind == "thinking" else []
        events.append(event("content_block_stop", {"index": self.index}))
        self.kind = None
        return events

    def _delta(self, kind: str, text: str) -> list[str]:
        events = self._open(kind) if self.kind != kind else []
        if kind == "text":
            events.append(event("content_block_delta", {"index": self.index,
                                                        "delta": {"type": "text_delta", "text": text}}))
        elif text and not self.omit_thinking:
            events.append(event("content_block_delta", {"index": self.index,
                                                        "delta": {"type": "thinking_delta", "thinking": text}}))
        return events

    def feed(self, output) -> list[str]:
        out = output.outputs[0]
        reasoning, text = self.parser.feed(out.text_delta)
        if out.finished:
            r, t = self.parser.finish()
            reasoning, text = reasoning + r, text + t
        calls = []
        if self.tools is not None:  # calls are parsed from the answer only, never from the thinking
            text, calls = self.tools.feed(text)
            if out.finished:
                t, more = self.tools.finish()
                text, calls = text + t, calls + more
        events = []
        if reasoning or (self.parser.saw_reasoning and self.index < 0):  # thinking opens with the message
            events += self._delta("thinking", reasoning)
        if text:
            events += self._delta("text", text)
        for call in calls:  # each call whole: its block, its input as one JSON delta, its stop
            block = _tool_use(call)
            events += self._open("tool_use", {**block, "input": {}})
            events.append(event("content_block_delta", {"index": self.index, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}}))
            events += self._close()
        self.num_calls += len(calls)
        return events

    def finish(self, last) -> list[str]:
        events = self._open("text") if self.index < 0 else []  # a message has at least one block
        events += self._close()
        reason, sequence = stop_reason(last.outputs[0], self.clipped, self.num_calls)
        events.append(event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence,
                                                        **_content_filter(last.outputs[0])},
                                              "usage": usage(last.usage)}))
        events.append(event("message_stop", {}))
        return events


def error_event(body: dict) -> str:
    """A failure after the 200 headers: Anthropic's `error` event (the SDK raises it); body is
    errors.anthropic_error_body's."""
    return event("error", {"error": body["error"]})
