"""Responses from engine outputs: pure builders of OpenAI-shaped completions, stream chunks and usage.

Owns turning `RequestOutput`s into the models of protocol.py: reasoning split from content (see
chat_format.ReasoningParser), tool calls parsed from the answer (tool_calls.ToolCallParser), finish
reasons, logprobs, usage, and the chunk sequence of a stream. No HTTP,
no engine calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from pydantic import BaseModel

from openr2.chat_format import ReasoningParser
from openr2.server.protocol import (
    MIN_LOGPROB,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    ChatResponseMessage,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionTokensDetails,
    ContentFilter,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    PromptTokensDetails,
    ResponseToolCall,
    TokenLogprob,
    TokenText,
    TopLogprob,
    UsageInfo,
    random_id,
)


def sse(chunk: BaseModel) -> str:
    """One server-sent event; end the stream with SSE_DONE."""
    return f"data: {chunk.model_dump_json()}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------- builders

_FINISH = {"stop": "stop", "length": "length", "abort": "length", "content_filter": "content_filter"}


def finish_reason(engine_reason: str | None) -> str | None:
    """Engine reason -> OpenAI's: stop, length; abort -> length (cut short, see the module docstring);
    content_filter (the operator's policy, policy.py) stays."""
    return None if engine_reason is None else _FINISH.get(engine_reason, "stop")


def content_filter(out) -> ContentFilter | None:
    """The policy rule that ended a choice (policy.py leaves it in stop_reason), else None."""
    return out.stop_reason if out.finish_reason == "content_filter" else None


def usage_from_engine(usage) -> UsageInfo:
    """Engine (or billing) Usage, or an iterable of them (one per prompt), -> the usage object we send."""
    usages = list(usage) if isinstance(usage, Iterable) else [usage]
    prompt = sum(u.prompt_tokens for u in usages)
    cached = sum(u.cached_prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_cache_hit_tokens=cached, prompt_cache_miss_tokens=prompt - cached,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
                     completion_tokens_details=CompletionTokensDetails(
                         reasoning_tokens=sum(u.reasoning_tokens for u in usages)))


def _logprob(x: float | None) -> float:
    return MIN_LOGPROB if x is None or math.isnan(x) or x < MIN_LOGPROB else float(x)


def _text(token_text: TokenText | None, token_id: int) -> str:
    return token_text(token_id) if token_text is not None else str(token_id)


def chat_logprobs(samples: list, token_text: TokenText | None) -> ChatLogprobs:
    """Engine TokenSamples (token_id, logprob, top) -> chat logprobs; bytes are the token text's UTF-8."""
    content = []
    for s in samples:
        tops = [TopLogprob(token=(t := _text(token_text, i)), logprob=_logprob(lp), bytes=list(t.encode()))
                for i, lp in (s.top or [])]
        token = _text(token_text, s.token_id)
        content.append(TokenLogprob(token=token, logprob=_logprob(s.logprob), bytes=list(token.encode()),
                                    top_logprobs=tops))
    return ChatLogprobs(content=content)


def completion_logprobs(samples: list, token_text: TokenText | None, offset: int = 0) -> CompletionLogprobs:
    """Legacy logprobs; text_offset counts characters from `offset` (where this piece of text starts)."""
    out = CompletionLogprobs()
    for s in samples:
        token = _text(token_text, s.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(_logprob(s.logprob))
        out.top_logprobs.append({_text(token_text, i): _logprob(lp) for i, lp in (s.top or [])})
        out.text_offset.append(offset)
        offset += len(token)
    return out


def tool_calls(calls: list, start: int = 0) -> list[DeltaToolCall]:
    """Parsed calls (tool_calls.ParsedCall) -> OpenAI's tool_calls with fresh ids, indexed from `start`."""
    return [DeltaToolCall(index=start + k, id=random_id("call_"),
                          function=FunctionCall(name=c.name, arguments=c.arguments)) for k, c in enumerate(calls)]


def chat_finish_reason(engine_reason: str | None, num_calls: int) -> str | None:
    """finish_reason of a chat choice: "tool_calls" when it ended by itself having made calls, never without."""
    reason = finish_reason(engine_reason)
    return "tool_calls" if reason == "stop" and num_calls else reason


def chat_completion_from_output(output, model: str, created: int, *, starts_in_reasoning: bool = False,
                                parse_reasoning: bool = True, token_text: TokenText | None = None,
                                id: str | None = None, tool_parser: Callable | None = None) -> ChatCompletion:
    """A finished RequestOutput -> the chat response; reasoning is split from content when parse_reasoning
    (starts_in_reasoning: the prompt ended inside `<think>`, see chat_format.prompt_opens_reasoning), then
    tool calls from the answer when the request has tools (tool_parser makes a tool_calls.ToolCallParser)."""
    choices = []
    for out in output.outputs:
        reasoning, content = None, out.text
        if parse_reasoning:
            reasoning, content = ReasoningParser(starts_in_reasoning).parse(out.text)
        calls = []
        if tool_parser is not None:
            content, calls = tool_parser().parse(content)
        message = ChatResponseMessage(content=content or (None if calls else content), reasoning_content=reasoning,
                                      tool_calls=[ResponseToolCall(**c.model_dump(exclude={"index"}))
                                                  for c in tool_calls(calls)] or None)
        logprobs = chat_logprobs(out.logprobs, token_text) if out.logprobs is not None else None
        choices.append(ChatChoice(index=out.index, finish_reason=chat_finish_reason(out.finish_reason, len(calls))
                                  or "stop", message=message, logprobs=logprobs, content_filter=content_filter(out)))
    return ChatCompletion(id=id or output.request_id, created=created, model=model, choices=choices,
                          usage=usage_from_engine(output.usage))


class ChatStream:
    """The chunks of one streamed chat request, in OpenAI's order: a role chunk per choice (`start`), then
    per engine output the reasoning and content deltas and, when a choice ends, a chunk with an empty
    content delta and its finish_reason (`feed`), then optionally the `choices: []` usage chunk (`usage_chunk`)."""

    def __init__(self, id: str, model: str, created: int, n: int = 1, *, starts_in_reasoning: bool = False,
                 parse_reasoning: bool = True, token_text: TokenText | None = None,
                 tool_parser: Callable | None = None):
        self.id, self.model, self.created, self.token_text = id, model, created, token_text
        self.parsers = [ReasoningParser(starts_in_reasoning) if parse_reasoning else None for _ in range(n)]
        self.tool_parsers = [tool_parser() if tool_parser else None for _ in range(n)]
        self.num_calls = [0] * n
        self.num_tokens = [0] * n  # tokens seen per choice: where the next logprobs start
        self.pending: list[list] = [[] for _ in range(n)]  # logprobs of tokens whose text is held back
        self.done = [False] * n

    def chunk(self, choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def start(self) -> list[ChatCompletionChunk]:
        return [self.chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                for i in range(len(self.done))]

    def feed(self, output) -> list[ChatCompletionChunk]:
        chunks = []
        for out in output.outputs:
            i = out.index
            if self.done[i]:
                continue
            if out.logprobs is not None and out.token_ids_delta:  # the list may have grown since: slice by count
                start = self.num_tokens[i]
                self.pending[i].extend(out.logprobs[start:start + len(out.token_ids_delta)])
            self.num_tokens[i] += len(out.token_ids_delta)
            parser = self.parsers[i]
            reasoning, content = parser.feed(out.text_delta) if parser else ("", out.text_delta)
            if out.finished and parser:
                r, c = parser.finish()
                reasoning, content = reasoning + r, content + c
            calls, tools = [], self.tool_parsers[i]
            if tools is not None:  # calls are parsed from the answer only, never from the reasoning
                content, calls = tools.feed(content)
                if out.finished:
                    c, more = tools.finish()
                    content, calls = content + c, calls + more
            pieces = [DeltaMessage(reasoning_content=reasoning)] if reasoning else []
            pieces += [DeltaMessage(content=content)] if content else []
            if calls:
                pieces.append(DeltaMessage(tool_calls=tool_calls(calls, self.num_calls[i])))
                self.num_calls[i] += len(calls)
            reason = chat_finish_reason(out.finish_reason, self.num_calls[i])
            if reason is not None:
                pieces.append(DeltaMessage(content=""))
                self.done[i] = True
            for k, delta in enumerate(pieces):
                logprobs = None
                if self.pending[i]:
                    logprobs, self.pending[i] = chat_logprobs(self.pending[i], self.token_text), []
                last = k == len(pieces) - 1
                chunks.append(self.chunk([ChatChunkChoice(index=i, delta=delta, logprobs=logprobs,
                                                          finish_reason=reason if last else None,
                                                          content_filter=content_filter(out) if last else None)]))
        return chunks

    def usage_chunk(self, usage) -> ChatCompletionChunk:
        return self.chunk([], usage_from_engine(usage))


def completion_from_outputs(outputs: list, model: str, created: int, *, id: str, n: int = 1, echo: bool = False,
                            token_text: TokenText | None = None) -> Completion:
    """Finished RequestOutputs, one per prompt in order -> the text completion; choice = prompt * n + sample."""
    choices = []
    for p, output in enumerate(outputs):
        prefix = _echo_text(output, token_text) if echo else ""
        for out in output.outputs:
            logprobs = completion_logprobs(out.logprobs, token_text, len(prefix)) if out.logprobs is not None else None
            choices.append(CompletionChoice(index=p * n + out.index, text=prefix + out.text, logprobs=logprobs,
                                            finish_reason=finish_reason(out.finish_reason) or "stop",
                                            content_filter=content_filter(out)))
    return Completion(id=id, created=created, model=model, choices=choices,
                      usage=usage_from_engine([o.usage for o in outputs]))


def _echo_text(output, token_text: TokenText | None) -> str:
    if output.prompt is not None:
        return output.prompt
    return "".join(_text(token_text, t) for t in output.prompt_token_ids) if token_text else ""


class CompletionStream:
    """Chunks of a streamed text completion: text deltas per choice, the last one with its finish_reason."""

    def __init__(self, id: str, model: str, created: int, n: int = 1, *, echo: bool = False,
                 token_text: TokenText | None = None):
        self.id, self.model, self.created, self.n = id, model, created, n
        self.echo, self.token_text = echo, token_text
        self.chars: dict[int, int] = {}  # choice -> characters sent (text_offset of the next token)
        self.num_tokens: dict[int, int] = {}
        self.done: set[int] = set()  # choices whose finish_reason was sent (later outputs still carry them)

    def chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionChunk:
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def feed(self, output, prompt_index: int = 0) -> list[CompletionChunk]:
        chunks = []
        for out in output.outputs:
            index = prompt_index * self.n + out.index
            if index in self.done:
                continue
            text = out.text_delta
            if index not in self.chars:
                self.chars[index], self.num_tokens[index] = 0, 0
                if self.echo:
                    text = _echo_text(output, self.token_text) + text
            reason = finish_reason(out.finish_reason)
            if not text and reason is None and not (out.logprobs is not None and out.token_ids_delta):
                continue  # (a token whose text is held back still sends its logprobs: counts stay aligned)
            if reason is not None:
                self.done.add(index)
            logprobs = None
            if out.logprobs is not None:
                start = self.num_tokens[index]
                samples = out.logprobs[start:start + len(out.token_ids_delta)]
                logprobs = completion_logprobs(samples, self.token_text, self.chars[index] + len(text)
                                               - len(out.text_delta))
            self.num_tokens[index] += len(out.token_ids_delta)
            self.chars[index] += len(text)
            chunks.append(self.chunk([CompletionChoice(index=index, text=text, finish_reason=reason,
                                                       logprobs=logprobs, content_filter=content_filter(out))]))
        return chunks

    def usage_chunk(self, usages) -> CompletionChunk:
        return self.chunk([], usage_from_engine(usages))

