"""Chat format: OpenAI-style messages -> prompt text / ids (+ SFT loss mask), and reasoning splitting.

Owns message validation, the built-in R1 renderer (plain Python), the jinja path for a tokenizer's own
`chat_template` (sandboxed, set up like transformers'), which thinking modes a template has
(`thinking_modes`) and which tool-call dialect it writes (`tool_support`, `with_tools`; the dialects and
their parser are tool_calls.py), fill-in-the-middle prompts (`fim_prompt`), `encode_chat_for_training`, `ReasoningParser`
(splits `<think>...</think>` from the answer, also incrementally) and `count_reasoning_tokens`. It does not
own tokenization nor the chat markers and the jinja twin of the built-in format that `train_bpe` stores
(tokenizer.py), nor the HTTP shapes (server/).

The format (R1, as in deepseek-ai/DeepSeek-R1's tokenizer_config.json):
    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{answer}<｜end▁of▁sentence｜>...<｜Assistant｜><think>\n
Earlier assistant turns keep only the text after their last `</think>`; `reasoning_content` is dropped.
Where the real template has bugs (tool turns only) we differ on purpose; see `_render_builtin`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from openr2.dsml import DSML_DIALECTS, DsmlDialect
from openr2.dsml_encoding import encode_v4, encode_v32
from openr2.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    FIM_BEGIN,
    FIM_END,
    FIM_HOLE,
    THINK_END,
    THINK_START,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
    TOOL_OUTPUTS_BEGIN,
    TOOL_OUTPUTS_END,
    TOOL_SEP,
    USER,
    Tokenizer,
)
from openr2.tool_calls import DIALECTS, ToolCallDialect

ROLES = ("system", "user", "assistant", "tool")
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
_NEWLINES = "\r\n"


# ---------------------------------------------------------------------------------------------- messages

def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"{where}[{j}]: only {{'type': 'text', 'text': str}} parts are supported")
            texts.append(part["text"])
        return "\n".join(texts)  # vLLM's choice for text parts: one per line
    raise ValueError(f"{where}: expected a string or a list of text parts, got {type(content).__name__}")


def _tool_call(call: Any, where: str) -> dict:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ValueError(f"{where}.function.name is missing")
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):  # the API sends a JSON string; accept a dict from Python callers
        args = json.dumps(args, ensure_ascii=False)
    return {**call, "type": call.get("type") or "function", "function": {**fn, "arguments": args}}


def normalize_messages(messages: Iterable[Any]) -> list[dict]:
    """Validate OpenAI-style messages and return plain dicts that both renderers can rely on.

    Like transformers, keys whose value is None are dropped (templates test `'tool_calls' in message`),
    except the content of a tool-calling turn, which is None when absent (DeepSeek's templates test
    `content is none`); content parts are joined; an empty `tool_calls` counts as none. Raises
    ValueError naming the field.
    """
    if isinstance(messages, (str, bytes, Mapping)):
        raise ValueError("messages: expected a list of message objects")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if hasattr(message, "model_dump"):  # pydantic objects, e.g. from the openai client
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}: expected an object with 'role' and 'content'")
        msg = {k: v for k, v in message.items() if v is not None}
        role = _ROLE_ALIASES.get(msg.get("role"), msg.get("role"))
        if role not in ROLES:
            raise ValueError(f"{where}.role: unknown role {message.get('role')!r}; expected one of {ROLES}")
        msg["role"] = role
        if msg.get("tool_calls") and role == "assistant":
            msg["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(msg["tool_calls"])]
        else:
            msg.pop("tool_calls", None)
        if "content" in msg:
            msg["content"] = _content_text(msg["content"], f"{where}.content")
        elif msg.get("tool_calls"):
            msg["content"] = None
        else:
            raise ValueError(f"{where}.content is missing")
        if not isinstance(msg.get("reasoning_content", ""), str):
            raise ValueError(f"{where}.reasoning_content: expected a string")
        out.append(msg)
    return out


# ---------------------------------------------------------------------------------------------- rendering

def _render_builtin(messages: list[dict], add_generation_prompt: bool, thinking: bool) -> list[tuple[str, bool]]:
    """The R1 format as (text, assistant_generated) pieces; join the texts for the prompt.

    Matches DeepSeek-R1's template except in tool turns, where that template has bugs we do not copy:
    it never resets its "first call"/"first output" flags (a second tool round loses its
    `<｜tool▁calls▁begin｜>`/`<｜tool▁outputs▁begin｜>`), never closes the outputs block before a user
    message or a further tool-calling turn, and keeps `<think>...</think>` in tool-calling turns and in
    answers that follow tool outputs. Here every assistant turn drops its reasoning and every outputs
    block is opened and closed.
    """
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out: list[tuple[str, bool]] = [(BOS + system, False)]
    in_outputs = outputs_seen = False
    for m in messages:
        role = m["role"]
        if role in ("user", "assistant") and in_outputs:
            out.append((TOOL_OUTPUTS_END, False))
        if role == "user":
            out.append((USER + m["content"], False))
        elif role == "assistant":
            if not in_outputs:  # after tool outputs the answer follows without a new marker, as in R1
                out.append((ASSISTANT, False))
            body = (m.get("content") or "").split(THINK_END)[-1]
            if m.get("tool_calls"):
                outputs_seen = False
                body += _tool_calls_text(m["tool_calls"])
            out.append((body + EOS, True))
        elif role == "tool":
            opener = "" if outputs_seen else TOOL_OUTPUTS_BEGIN
            outputs_seen = True
            out.append((opener + TOOL_OUTPUT_BEGIN + m["content"] + TOOL_OUTPUT_END, False))
        in_outputs = role == "tool" or (in_outputs and role == "system")
    if in_outputs:
        out.append((TOOL_OUTPUTS_END, False))  # the model continues right after the outputs
    elif add_generation_prompt:
        out.append((ASSISTANT + (THINK_START + "\n" if thinking else ""), False))
    return out


def _tool_calls_text(calls: list[dict]) -> str:
    return TOOL_CALLS_BEGIN + "\n".join(
        f"{TOOL_CALL_BEGIN}{c['type']}{TOOL_SEP}{c['function']['name']}\n```json\n{c['function']['arguments']}\n```{TOOL_CALL_END}"
        for c in calls) + TOOL_CALLS_END


@lru_cache(maxsize=16)
def _compile(template: str):
    """Compile like transformers does (sandboxed, trim/lstrip blocks, loop controls, tojson without HTML
    escaping, raise_exception, strftime_now), so Hub templates render here as they do there."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: jinja syntax error at line {e.lineno}: {e.message}") from e


def _pick_template(tokenizer: Tokenizer | None, template: str | None) -> str | None:
    named = tokenizer.chat_templates if tokenizer is not None else {}
    if template is not None:
        return named.get(template, template)  # a name of one of the tokenizer's templates, or jinja text
    return tokenizer.chat_template if tokenizer is not None else None


# Checkpoints whose release ships no jinja template, only a Python encoder (their model_type -> ours):
# DeepSeek-V3.2 (V3.2-Exp still had a template, in the V3.1 dialect, and keeps it) and V4.
ENCODERS = {"deepseek_v32": encode_v32, "deepseek_v4": encode_v4}
# their options: V4's encoder also takes a reasoning effort ("high" or "max", dsml_encoding.V4_EFFORTS)
ENCODER_OPTIONS = {"deepseek_v32": {"thinking", "tools"}, "deepseek_v4": {"thinking", "tools", "reasoning_effort"}}


def render_chat(messages: Iterable[Any], tokenizer: Tokenizer | None = None, add_generation_prompt: bool = True,
                template: str | None = None, model_type: str | None = None, **template_kwargs: Any) -> str:
    """Render messages to prompt text.

    With a template (the `template` argument, else the tokenizer's `chat_template`) render it with jinja;
    else a checkpoint of a `model_type` in ENCODERS gets its release's encoder (options: `tools`, `thinking`,
    off by default as on DeepSeek's API, and for V4 `reasoning_effort`; its user turns end with the generation prompt whatever
    add_generation_prompt says); otherwise use the built-in R1 format, where `thinking=False` ends the prompt with `<｜Assistant｜>`
    instead of `<｜Assistant｜><think>\\n`. Extra keyword arguments go to the template (tools, thinking...),
    which decides what they mean (DeepSeek-R1's own template ignores `thinking`; the built-in format
    refuses options it does not have rather than drop them, e.g. `tools`).
    """
    msgs = normalize_messages(messages)
    source = _pick_template(tokenizer, template)
    if source is None and model_type in ENCODERS:
        unknown = set(template_kwargs) - ENCODER_OPTIONS[model_type]
        if unknown:
            raise ValueError(f"{model_type} chat format: unknown option(s) {sorted(unknown)}")
        extra = {k: template_kwargs[k] for k in ("reasoning_effort",) if k in template_kwargs}
        return ENCODERS[model_type](msgs, template_kwargs.get("tools"), bool(template_kwargs.get("thinking", False)),
                                    **extra)
    if source is None:
        unknown = set(template_kwargs) - {"thinking"}
        if unknown:
            raise ValueError(f"built-in chat format: unknown option(s) {sorted(unknown)}; only 'thinking' exists")
        return "".join(t for t, _ in _render_builtin(msgs, add_generation_prompt, template_kwargs.get("thinking", True)))
    import jinja2

    specials = {"bos_token": BOS, "eos_token": EOS}
    if tokenizer is not None:
        specials = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    try:
        return _compile(source).render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                       **{**specials, **template_kwargs})
    except jinja2.TemplateError as e:  # raise_exception() and template bugs: the caller's input is at fault
        raise ValueError(f"chat_template: {e}") from e


def encode_chat(messages: Iterable[Any], tokenizer: Tokenizer, add_generation_prompt: bool = True,
                template: str | None = None, **template_kwargs: Any) -> list[int]:
    """render_chat, then encode; the rendered text carries BOS itself, so no special tokens are added."""
    text = render_chat(messages, tokenizer, add_generation_prompt, template, **template_kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when the prompt ends inside an open `<think>` (R1's generation prompt): parse the output with
    `ReasoningParser(starts_in_reasoning=True)`. Decide from the prompt, not a flag, so a template
    change cannot silently move reasoning into content (vllm#12999)."""
    return prompt.rstrip(_NEWLINES + " ").endswith(THINK_START)


def thinking_modes(tokenizer: Tokenizer | None = None, template: str | None = None,
                   model_type: str | None = None) -> frozenset[bool]:
    """The thinking modes a chat template can open: {True} (R1: always `<think>`), {False} (no reasoning) or
    both (V3.1 and later, and the built-in format: the `thinking` option switches). Found by rendering one
    user message each way and asking prompt_opens_reasoning, so it holds for any template."""
    msgs = [{"role": "user", "content": "Hi"}]
    return frozenset(prompt_opens_reasoning(render_chat(msgs, tokenizer, template=template, model_type=model_type,
                                                        thinking=mode))
                     for mode in (True, False))


@dataclass(frozen=True)
class ToolSupport:
    """How a chat template handles tools: the dialect its past calls are written in (None: it has none, so
    the model cannot be asked for calls) and whether it describes `tools` itself."""

    dialect: ToolCallDialect | DsmlDialect | None
    renders_tools: bool


_PROBE_CALL = {"id": "call_probe", "type": "function",
               "function": {"name": "probe_tool", "arguments": '{"probe": 1}'}}
_PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool", "description": "probe",
                                                "parameters": {"type": "object"}}}


def tool_support(tokenizer: Tokenizer | None = None, template: str | None = None,
                 model_type: str | None = None) -> ToolSupport:
    """Read the tool-call dialect from the template itself: render a past call and see which way it is
    written; then whether a `tools` option shows up in the prompt."""
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": [_PROBE_CALL]}]
    try:
        text = render_chat(msgs, tokenizer, add_generation_prompt=False, template=template, model_type=model_type)
    except ValueError:
        text = ""
    args = _PROBE_CALL["function"]["arguments"]
    dialect = next((d for d in (*DIALECTS, *DSML_DIALECTS) if d.probe_text("probe_tool", args) in text), None)
    try:
        shown = render_chat(msgs[:1], tokenizer, template=template, model_type=model_type, tools=[_PROBE_TOOL])
    except ValueError:  # the built-in renderer takes no tools option
        shown = ""
    return ToolSupport(dialect, "probe_tool" in shown)


def with_tools(messages: list[dict], tools: list[dict], support: ToolSupport) -> tuple[list[dict], dict]:
    """(messages, template options) that show `tools` (OpenAI's shape) to the model: through the template's
    own `tools` option where it has one, else as a system message in the dialect's terms (tool_calls.py)."""
    if support.renders_tools:
        return messages, {"tools": tools}
    lead = next((i for i, m in enumerate(messages) if m.get("role") not in ("system", "developer")), len(messages))
    prompt = {"role": "system", "content": support.dialect.tools_prompt(tools)}
    return [*messages[:lead], prompt, *messages[lead:]], {}


def has_fim(tokenizer: Tokenizer) -> bool:
    """Whether the vocabulary has DeepSeek's three fill-in-the-middle tokens."""
    return all(tokenizer.token_to_id(t) is not None for t in (FIM_BEGIN, FIM_HOLE, FIM_END))


def fim_prompt(prefix: str, suffix: str, tokenizer: Tokenizer) -> str:
    """The fill-in-the-middle prompt in DeepSeek's format (DeepSeek-Coder, V3): the model then writes the
    text between prefix and suffix. BOS leads, as DeepSeek's tokenizer adds it. ValueError without FIM tokens."""
    if not has_fim(tokenizer):
        raise ValueError("the tokenizer has no fill-in-the-middle tokens")
    return (tokenizer.bos_token or "") + FIM_BEGIN + prefix + FIM_HOLE + suffix + FIM_END


# ---------------------------------------------------------------------------------------------- training

def _split_reasoning(message: dict) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant message: `reasoning_content` wins over `<think>` in content."""
    content = message.get("content") or ""
    reasoning, answer = None, content
    if THINK_END in content:
        reasoning, answer = ReasoningParser(starts_in_reasoning=True).parse(content)
    if message.get("reasoning_content") is not None:
        reasoning = message["reasoning_content"].strip(_NEWLINES)
    return reasoning, answer.lstrip(_NEWLINES)


def encode_chat_for_training(messages: Iterable[Any], tokenizer: Tokenizer, thinking: bool = True,
                             train_on_all_turns: bool = False) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) for SFT on the final assistant message, built to match inference exactly.

    The prompt is the built-in rendering of everything before that message with the generation prompt
    (mask 0), encoded on its own as the engine would; the completion is what the model must write after
    it (mask 1): `{reasoning}\\n</think>\\n\\n{answer}<｜end▁of▁sentence｜>` after the `<think>\\n` the prompt
    forced (or `{answer}<eos>` with thinking=False; `<think>\\n` itself is generated when the prompt did not
    open it, e.g. after tool outputs). Earlier assistant turns appear as the prompt shows them (no
    reasoning) and are context; `train_on_all_turns=True` also puts 1 on their answer and EOS tokens.
    Always the built-in format, which is also the template `train_bpe` stores: a tokenizer with some
    other template would be served prompts that differ from these.
    """
    msgs = normalize_messages(messages)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise ValueError("messages: the last message must be the assistant's reply to train on")
    pieces = _render_builtin(msgs[:-1], add_generation_prompt=True, thinking=thinking)
    if not train_on_all_turns:
        pieces = [(t, False) for t, _ in pieces]
    last = msgs[-1]
    reasoning, answer = _split_reasoning(last)
    if last.get("tool_calls"):
        answer += _tool_calls_text(last["tool_calls"])
    opened = prompt_opens_reasoning(pieces[-1][0])
    if opened:
        completion = (reasoning or "") + "\n" + THINK_END + "\n\n" + answer
    elif reasoning is not None and thinking:
        completion = THINK_START + "\n" + reasoning + "\n" + THINK_END + "\n\n" + answer
    else:
        completion = answer
    pieces.append((completion + EOS, True))
    ids: list[int] = []
    mask: list[int] = []
    run, flag = "", False
    for text, gen in pieces + [("", None)]:  # encode maximal runs, so the prompt is tokenized as one text
        if gen is not flag and run:
            piece_ids = tokenizer.encode(run, add_special_tokens=False)
            ids += piece_ids
            mask += [int(flag)] * len(piece_ids)
            run = ""
        run, flag = run + text, gen
    return ids, mask


# ---------------------------------------------------------------------------------------------- reasoning

def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (a tag maybe cut by a delta)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    """Splits model output into (reasoning, content), in one go or delta by delta, with equal results.

    Output shapes: `<think>\\nR\\n</think>\\n\\nA` (old R1 template), `R\\n</think>\\n\\nA` after a prompt
    that ends with `<think>\\n` (pass starts_in_reasoning=True; a leading `<think>` is still accepted), or
    plain `A`. As DeepSeek's API returns them, reasoning has no tags and no newlines at either end, and
    content has no leading newlines. Only a `<think>` at the very start (after newlines) opens reasoning;
    later tags in the answer are text. If `</think>` never comes, everything after the opening is
    reasoning — with starts_in_reasoning that is the whole output (vLLM does the same; streamed deltas
    could not be taken back anyway). So set starts_in_reasoning from the prompt (prompt_opens_reasoning),
    not per model, or an answer without tags lands in reasoning (sglang#4539).
    """

    _START, _REASONING, _CONTENT = range(3)

    def __init__(self, starts_in_reasoning: bool = False, start_tag: str = THINK_START, end_tag: str = THINK_END):
        self.starts_in_reasoning = starts_in_reasoning
        self.start_tag, self.end_tag = start_tag, end_tag
        self._state = self._START
        self._buf = ""
        self._fresh = True  # at the start of a section, where newlines are dropped
        self.saw_reasoning = starts_in_reasoning

    def parse(self, text: str) -> tuple[str | None, str]:
        """Whole output -> (reasoning or None when there was no reasoning section, content)."""
        p = ReasoningParser(self.starts_in_reasoning, self.start_tag, self.end_tag)
        r1, c1 = p.feed(text)
        r2, c2 = p.finish()
        return (r1 + r2 if p.saw_reasoning else None), c1 + c2

    def feed(self, delta: str) -> tuple[str, str]:
        """Next piece of output -> (reasoning_delta, content_delta); either may be ''."""
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        """End of output: release what was held back (a partial tag that never completed)."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            buf = self._buf
            if self._state == self._START:
                head = buf.lstrip(_NEWLINES)
                if head.startswith(self.start_tag):
                    self._buf, self._state, self.saw_reasoning = head[len(self.start_tag):], self._REASONING, True
                elif self.start_tag.startswith(head) and not final:
                    break  # could still become `<think>`
                else:
                    self._state = self._REASONING if self.starts_in_reasoning else self._CONTENT
                self._fresh = True
            elif self._state == self._REASONING:
                i = buf.find(self.end_tag)
                if i >= 0:
                    self._emit(reasoning, buf[:i].rstrip(_NEWLINES))
                    self._buf, self._state, self._fresh = buf[i + len(self.end_tag):], self._CONTENT, True
                    continue
                if final:
                    self._emit(reasoning, buf.rstrip(_NEWLINES))
                    self._buf = ""
                    break
                # Hold back a possible partial `</think>` and the newlines before it (dropped if it closes).
                body = buf[:len(buf) - _partial_suffix(buf, self.end_tag)].rstrip(_NEWLINES)
                self._emit(reasoning, body)
                self._buf = buf[len(body):]
                break
            else:
                self._emit(content, buf)
                self._buf = ""
                break
        return "".join(reasoning), "".join(content)

    def _emit(self, out: list[str], text: str) -> None:
        if self._fresh:
            text = text.lstrip(_NEWLINES)
        if text:
            self._fresh = False
            out.append(text)


def count_reasoning_tokens(token_ids: Sequence[int], think_end_id: int, starts_in_reasoning: bool = True,
                           think_start_id: int | None = None) -> int:
    """Reasoning tokens of one completion, counted on ids (text matching miscounts, vllm#44398).

    Counts from the start through the first `</think>` inclusive (and a leading `<think>`), so
    completion_tokens - reasoning_tokens is the answer. With no `</think>` the whole output is reasoning
    when it started in reasoning. Without starts_in_reasoning, reasoning needs a leading think_start_id.
    """
    ids = list(token_ids)
    if not starts_in_reasoning and (think_start_id is None or not ids or ids[0] != think_start_id):
        return 0
    return ids.index(think_end_id) + 1 if think_end_id in ids else len(ids)
