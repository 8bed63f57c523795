"""The wire format: OpenAI-shaped request and response models (builders from engine outputs: outputs.py).

Owns what a client may send to /v1/chat/completions and /v1/completions (validated here, so a bad value
is a 400 that names its parameter), their conversion to the engine's SamplingParams, the response and
stream-chunk models (OpenAI's shapes plus DeepSeek's `reasoning_content` and `prompt_cache_*` usage
fields), and functions that turn `RequestOutput`s into those responses. It does not run the engine,
render chat templates, frame SSE beyond one line, or know about HTTP routes (serving_*.py, app.py).

Parameter policy (OpenAI clients send many fields, and anything via extra_body):
  * honoured: OpenAI's sampling fields, `max_tokens` / `max_completion_tokens` (both given: the smaller
    wins; the cap covers reasoning too), `stop`, `n`, `seed`, `logprobs`, `stream_options.include_usage`,
    and vLLM's extras (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`, ...);
    DeepSeek's `thinking`, vLLM's `chat_template_kwargs.thinking` and `reasoning_effort` ("none": off,
    any other level: on) are read by `thinking_choice`. `tools` with `tool_choice` "auto" (or absent) are
    shown to the model in its template's tool format and its calls parsed from the answer;
    `parallel_tool_calls: false` keeps the first call. With `tool_choice: "none"` tools are not shown.
    `tool_choice` "required" or a named function, `strict` tools, and `response_format` json_object /
    json_schema (chat and completions) are kept by constrained decoding (engine/grammar.py; the grammars
    are built in chat_template.py): the arguments or the answer always parse and match the schema.
  * accepted and ignored (they do not change the output): `user`, `metadata`, `store`, `service_tier`,
    `prompt_cache_key`, ... and any unknown field, since clients pass arbitrary `extra_body` keys; assistant
    `reasoning_content` on input is never an error, and reaches the template only on the tool-calling turns
    of the current user turn (see template_messages). Past assistant `tool_calls` must have OpenAI's shape
    (`function.name` and `function.arguments` strings) for the template to render them.
  * rejected with a 400 naming the parameter, because we would silently answer something else:
    `response_format` json with tools (one grammar per answer), non-text content parts, `logit_bias`, `audio`, `prediction`, legacy
    `functions`, `best_of` != n, `echo` with `logprobs` or `suffix`, and guided-decoding extras. `suffix`
    (fill-in-the-middle) is accepted here with text prompts; the server refuses it for a model whose
    tokenizer has no FIM tokens.

finish_reason "content_filter" comes only from the operator's policy (policy.py), with `content_filter: {rule,
on}` beside it on the choice (ContentFilter). finish_reason: the engine's "abort" (client gone, server shutting down, deadline) maps to "length":
OpenAI's Literal has no "abort", and "length" is the one value that tells a client the text was cut
short; "stop" would claim a complete answer.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from openr2.server.errors import (
    ParamError,
    bad_request,
    context_length_exceeded,
    from_validation_errors,
)

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]
TokenText = Callable[[int], str]  # token id -> its text, for logprobs (e.g. lambda i: tok.decode([i]))
MAX_STOP_SEQUENCES = 16  # DeepSeek's limit (OpenAI allows 4)
MIN_LOGPROB = -9999.0  # OpenAI's stand-in for "very unlikely"; JSON has no -inf
# OpenAI's values and DeepSeek's ("max"); the templates have no effort levels, only thinking on or off
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def random_id(prefix: str) -> str:
    """"chatcmpl-", "cmpl-": OpenAI-style ids."""
    return prefix + secrets.token_hex(12)


def json_body_doc(model) -> dict:
    """openapi_extra documenting a JSON body the handler reads itself (metadata only: validation stays with
    the model). The model's $defs are inlined, as refs inside openapi_extra would not resolve."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.split("/")[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


# Fields clients send that we cannot honour: name -> what makes the value a request for the feature.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    **dict.fromkeys(["logit_bias", "audio", "prediction", "web_search_options", "functions", "function_call",
                     "min_tokens", "use_beam_search", "prompt_logprobs", "guided_json", "guided_regex",
                     "guided_choice", "guided_grammar", "structured_outputs"], bool),  # null/0/{}/false: harmless
    "modalities": lambda v: bool(v) and v != ["text"],
}


class _Strict(BaseModel):
    # strict: no "3" -> 3 or true -> 1; unknown fields are dropped (clients send many harmless extras)
    model_config = ConfigDict(extra="ignore", strict=True)


# ---------------------------------------------------------------------------------------------- requests

class StreamOptions(_Strict):
    include_usage: bool | None = False


class ToolCallFunction(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it back


class ToolCall(_Strict):
    """A past assistant tool call, as the chat template reads it (OpenAI's shape)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # str, a list of {"type": "text", "text": ...} parts, or None for tool-call turns
    name: str | None = None
    reasoning_content: str | None = None  # kept: thinking-mode tool turns must pass it back (DeepSeek)
    prefix: bool | None = False  # DeepSeek chat prefix completion: continue this last assistant message
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("expected a string or a list of content parts")
        for j, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"part {j}: only text parts ({{'type': 'text', 'text': ...}}) are supported, "
                                 f"got type {kind!r}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.prefix and self.role != "assistant":
            raise ValueError("only an assistant message can be a prefix")
        return self


MAX_N = 128  # OpenAI's limit on choices per request
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's and DeepSeek's rule


def _check_tool(tool: Any, where: str) -> None:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
        raise ParamError(where, f"{where} must be {{'type': 'function', 'function': {{'name': ...}}}}.")
    if not isinstance(fn.get("name"), str) or not _TOOL_NAME.fullmatch(fn["name"]):
        raise ParamError(f"{where}.function.name", "a function name is 1 to 64 of a-z, A-Z, 0-9, _ and -.")
    if not isinstance(fn.get("description", ""), str) or not isinstance(fn.get("parameters", {}), dict):
        raise ParamError(where, f"{where}.function: description is a string and parameters a JSON Schema object.")
    if not isinstance(fn.get("strict", False), (bool, type(None))):
        raise ParamError(f"{where}.function.strict", "strict is a boolean.")


_SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _check_response_format(v: Any) -> Any:
    """OpenAI's response_format: text, json_object, or json_schema {name, schema, strict, description}."""
    if v is None:
        return v
    if not isinstance(v, dict):
        raise ParamError("response_format", "response_format must be an object such as {'type': 'json_object'}.")
    kind = v.get("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise ParamError("response_format", f"response_format type {kind!r} is not one of 'text', 'json_object', "
                                            f"'json_schema'.")
    if kind == "json_schema":
        spec = v.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) \
                or not _SCHEMA_NAME.fullmatch(spec["name"]):
            raise ParamError("response_format", "response_format json_schema needs a name of 1 to 64 of a-z, A-Z, "
                                                "0-9, _ and -.")
        if not isinstance(spec.get("schema", {}), dict) or not isinstance(spec.get("strict", False), (bool, type(None))):
            raise ParamError("response_format", "response_format json_schema: schema is a JSON Schema object and "
                                                "strict a boolean.")
    return v


class _SamplingRequest(_Strict):
    """Fields shared by chat and text completions."""

    model: str
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: Any = None
    max_tokens: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks are shared only between equal salts (of one key)
    response_format: dict | None = None

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format(cls, v):
        return _check_response_format(v)

    @property
    def json_schema(self) -> dict | None:
        """The JSON Schema the answer must match (any object for json_object); None for free text."""
        kind = (self.response_format or {}).get("type", "text")
        if kind == "json_object":
            return {"type": "object"}
        if kind == "json_schema":
            return self.response_format["json_schema"].get("schema") or {"type": "object"}
        return None

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data):
        if isinstance(data, dict):
            for name, wants in _UNSUPPORTED.items():
                if name in data and wants(data[name]):
                    raise ParamError(name, f"'{name}' is not supported by this server.")
        return data

    @field_validator("cache_salt")
    @classmethod
    def _cache_salt(cls, v):
        if v is not None and not 0 < len(v) <= 256:
            raise ValueError("expected a non-empty string of at most 256 characters")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("expected a non-empty string or a list of them")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return stops or None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @classmethod
    def parse(cls, data: Any):
        """Validate a decoded JSON body; every problem is an APIError (400) naming its parameter."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise from_validation_errors(e.errors()) from None

    # subclasses say which of their fields the engine's max_tokens / logprobs came from
    def _asked_max_tokens(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"

    def _logprobs(self) -> tuple[int | None, str]:
        return None, "logprobs"

    prompt_param: ClassVar[str] = "prompt"  # blamed when the prompt does not fit the context

    def to_sampling_params(self, default_max_tokens: int | None, max_model_len: int,
                           num_prompt_tokens: int | None = None, defaults: dict | None = None,
                           clip_max_tokens: bool = False, structured_outputs=None):
        """The engine's SamplingParams; with num_prompt_tokens, prompt + max_tokens must fit max_model_len
        (or, with clip_max_tokens, max_tokens is cut to the room left: Anthropic's clients ask for more).

        `defaults` (the model's generation_config.json, as vLLM uses it) fill the sampling options the
        request leaves out.
        Without max_tokens the cap is default_max_tokens (None: until the context is full), clipped to the
        room left. Raises APIError: 400 with `param`, code "context_length_exceeded" when it cannot fit.
        Every option's range is SamplingParams' (one set of rules, also for offline use: whatever the
        sampler cannot take); a value out of it is a 400 naming the request's parameter.
        """
        from openr2.engine.sampling import (  # the engine (torch) only when needed
            SamplingParams,
            max_tokens_for,
        )

        asked, max_param = self._asked_max_tokens()
        room = max_model_len if num_prompt_tokens is None else max_model_len - num_prompt_tokens
        if num_prompt_tokens is not None and room < 1:
            raise context_length_exceeded(num_prompt_tokens, asked, max_model_len, self.prompt_param)
        if clip_max_tokens and isinstance(asked, int) and asked > room:
            asked = room
        if asked is None:
            max_tokens = max_tokens_for(None, max_model_len, num_prompt_tokens, default_max_tokens)
        elif isinstance(asked, int) and asked > room:
            if num_prompt_tokens is None:
                raise bad_request(f"{max_param} must be at most {max_model_len}, the context length.", max_param)
            raise context_length_exceeded(num_prompt_tokens, asked, max_model_len, self.prompt_param)
        else:
            max_tokens = asked
        logprobs, logprobs_param = self._logprobs()
        if isinstance(self.n, int) and self.n > MAX_N:  # unbounded n would hold the engine for hours
            raise bad_request(f"n must be at most {MAX_N}, got {self.n}.", "n")
        options = dict(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                       min_p=self.min_p, presence_penalty=self.presence_penalty,
                       frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                       seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                       ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
                       include_stop_str_in_output=self.include_stop_str_in_output)
        options = {**(defaults or {}), **{k: v for k, v in options.items() if v is not None}}
        rename = {"max_tokens": max_param, "logprobs": logprobs_param}
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, structured_outputs=structured_outputs,
                                  **options)
        except ValueError as e:  # SamplingParams names the field first: "top_p must be in (0, 1], ..."
            message = str(e)
            field = message.split(" ", 1)[0]
            param = rename.get(field, field if field in options else None)
            if param is not None:  # say it with the request's name: top_logprobs, not logprobs
                message = param + message[len(field):]
            raise bad_request(message.rstrip(".") + ".", param) from None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    thinking: dict | None = None  # DeepSeek: {"type": "enabled" | "disabled"}
    reasoning_effort: str | None = None  # OpenAI's and DeepSeek's: "none" turns thinking off, the rest on
    chat_template_kwargs: dict | None = None  # vLLM/SGLang: {"thinking": bool} or {"enable_thinking": bool}

    prompt_param: ClassVar[str] = "messages"

    @field_validator("thinking")
    @classmethod
    def _thinking(cls, v):
        if v is not None and v.get("type") not in ("enabled", "disabled"):
            raise ValueError("expected {'type': 'enabled'} or {'type': 'disabled'}")
        return v

    @field_validator("reasoning_effort")
    @classmethod
    def _reasoning_effort(cls, v):
        if v is not None and v not in REASONING_EFFORTS:
            raise ValueError(f"expected one of {', '.join(REASONING_EFFORTS)}")
        return v

    @model_validator(mode="after")
    def _check(self):
        for i, m in enumerate(self.messages[:-1]):
            if m.prefix:
                raise ParamError(f"messages[{i}].prefix", "only the last message can be a prefix.")
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs requires logprobs to be true.")
        choice = self.tool_choice
        named = isinstance(choice, dict) and choice.get("type", "function") == "function" \
            and isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)
        if choice not in (None, "none", "auto", "required") and not named:
            raise ParamError("tool_choice", "tool_choice is 'none', 'auto', 'required' or "
                                            "{'type': 'function', 'function': {'name': ...}}.")
        if (choice == "required" or named) and not self.tools:
            raise ParamError("tool_choice", "tool_choice 'required' or a named function needs tools.")
        for k, tool in enumerate(self.tools if self.tools_active else []):  # with "none" they are never shown
            _check_tool(tool, f"tools[{k}]")
        if named and choice["function"]["name"] not in self.tool_names:
            raise ParamError("tool_choice", f"tool_choice names {choice['function']['name']!r}, which is not "
                                            f"one of the tools.")
        if self.json_schema is not None and self.tools_active:
            raise ParamError("response_format", "response_format json_object / json_schema cannot be combined "
                                                "with tools; use a tool's parameters schema, or tool_choice 'none'.")
        return self

    @property
    def forced_tools(self) -> list[str] | None:
        """The tools one of which the answer must call (tool_choice 'required' or named), else None."""
        if self.tool_choice == "required":
            return self.tool_names
        if isinstance(self.tool_choice, dict):
            return [self.tool_choice["function"]["name"]]
        return None

    @property
    def tools_active(self) -> bool:
        """Whether the model is shown the tools and its calls are parsed (tool_choice auto)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def tool_names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools or []]

    def _asked_max_tokens(self):
        given = [(v, k) for k, v in (("max_tokens", self.max_tokens),
                                     ("max_completion_tokens", self.max_completion_tokens)) if v is not None]
        return min(given) if given else (None, "max_completion_tokens")

    def _logprobs(self):
        return (self.top_logprobs or 0) if self.logprobs else None, "top_logprobs"

    @property
    def thinking_enabled(self) -> bool | None:
        """True/False when the request chose thinking mode, None for the model's default."""
        return self.thinking_choice()[0]

    def thinking_choice(self) -> tuple[bool | None, str | None]:
        """(thinking mode, the parameter that chose it), or (None, None) for the model's default. DeepSeek's
        `thinking` wins over vLLM's `chat_template_kwargs`, which wins over `reasoning_effort`."""
        if self.thinking is not None:
            return self.thinking["type"] == "enabled", "thinking"
        kwargs = self.chat_template_kwargs or {}
        for key in ("thinking", "enable_thinking"):
            if isinstance(kwargs.get(key), bool):
                return kwargs[key], "chat_template_kwargs"
        if self.reasoning_effort is not None:
            return self.reasoning_effort != "none", "reasoning_effort"
        return None, None

    @property
    def assistant_prefix(self) -> str | None:
        """The text to continue when the last message is an assistant prefix, else None."""
        last = self.messages[-1]
        if not last.prefix:
            return None
        content = last.content or ""
        return content if isinstance(content, str) else "\n".join(p["text"] for p in content)

    def template_messages(self) -> list[dict]:
        """Messages for chat_format.render_chat, without a trailing prefix message (see assistant_prefix).

        An assistant's `reasoning_content` is kept where DeepSeek's API keeps it: on the tool-calling turns
        after the last user message (thinking mode must see the reasoning of the tool loop it is in);
        elsewhere it is dropped, as DeepSeek drops the reasoning of earlier turns."""
        msgs = self.messages[:-1] if self.messages[-1].prefix else self.messages
        last_user = max((i for i, m in enumerate(msgs) if m.role == "user"), default=-1)
        out = []
        for i, m in enumerate(msgs):
            keep_reasoning = m.role == "assistant" and bool(m.tool_calls) and i > last_user
            out.append(m.model_dump(exclude_none=True, exclude={"prefix"} if keep_reasoning
                                    else {"prefix", "reasoning_content"}))
        return out


class CompletionRequest(_SamplingRequest):
    prompt: Any
    suffix: str | None = None
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    # vLLM's extension: logprob tokens named "token_id:<id>", not by text (unambiguous: what a gateway asks for)
    return_tokens_as_token_ids: bool | None = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        def ids(x):
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str) or ids(v):
            return v
        if isinstance(v, list) and v and (all(isinstance(p, str) for p in v) or all(ids(p) for p in v)):
            return v
        raise ValueError("expected a string, a list of strings, a list of token ids or a list of such lists, "
                         "none of them empty")

    @model_validator(mode="after")
    def _check(self):
        if self.suffix and any(not isinstance(p, str) for p in self.prompts()):
            raise ParamError("suffix", "suffix (fill-in-the-middle) takes text prompts, not token ids.")
        if self.suffix and self.echo:
            raise ParamError("echo", "echo is not supported with suffix (fill-in-the-middle).")
        if self.best_of not in (None, 1, self.n):
            raise ParamError("best_of", "best_of is not supported; use n.")
        if self.echo and self.logprobs is not None:
            raise ParamError("echo", "echo with logprobs needs prompt logprobs, which are not supported.")
        return self

    def _logprobs(self):
        return self.logprobs, "logprobs"

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)


# ---------------------------------------------------------------------------------------------- responses

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_cache_hit_tokens: int = 0  # DeepSeek's names; hit + miss = prompt_tokens
    prompt_cache_miss_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = Field(default_factory=CompletionTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None

    @model_serializer(mode="wrap")
    def _calls_when_any(self, handler):
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class DeltaToolCall(ResponseToolCall):
    """A streamed call: OpenAI's delta shape, sent whole (id, name and all its arguments in one fragment)."""

    index: int


class ContentFilter(BaseModel):
    """Which rule of the operator's content policy (policy.py) ended a choice, and whether it refused the request
    or the answer; sent as the choice's `content_filter` beside finish_reason "content_filter" (an openr2 field:
    Azure's `content_filter_results` holds fixed categories with severities, which an operator's rule is not)."""

    rule: str
    on: Literal["request", "answer"]


class _Filterable(BaseModel):
    content_filter: ContentFilter | None = None  # only on a choice the policy ended

    @model_serializer(mode="wrap")
    def _filter_when_any(self, handler):
        data = handler(self)
        found = data.pop("content_filter", None)  # last, after finish_reason, when there is one
        if found is not None:
            data["content_filter"] = found
        return data


class ChatChoice(_Filterable):
    index: int
    message: ChatResponseMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _role_once(self, handler):
        # role only on the first delta (OpenAI), tool_calls only where there are some; content and
        # reasoning_content always, null when unused: DeepSeek's documented loop reads delta.reasoning_content
        # on every chunk and appends delta.content whenever it is falsy, so the finish chunk carries content ""
        # (see ChatStream)
        data = handler(self)
        for key in ("role", "tool_calls"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class ChatChunkChoice(_Filterable):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None  # null on every chunk but the final `choices: []` one


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Filterable):
    index: int
    text: str
    finish_reason: Literal["stop", "length", "content_filter"] | None = None  # None only mid-stream
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionChunk(Completion):
    """Stream chunks of /v1/completions have the same shape as the response (OpenAI's rule)."""


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "openr2"
    max_model_len: int | None = None
    root: str | None = None  # vLLM's field: the served model an alias names


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
