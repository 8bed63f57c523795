"""Tool calls in DeepSeek's chat formats: how a model writes them, how tools are described to it, and parsing
the calls back out of its answer (whole, or delta by delta with the same result).

DeepSeek's templates write calls in one of two dialects (vllm#23454: parsers are template-specific):

    V3 (DeepSeek-V3, R1 and openr2's built-in format), calls separated by a newline:
        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>
    V3.1 (DeepSeek-V3.1, V3.2-Exp), calls chained without separators:
        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜><｜tool▁calls▁end｜>

Which one a checkpoint speaks is read from its own chat template (chat_format.tool_dialect renders a past call
with it). DeepSeek's released templates do not describe the available tools (its API adds them to the system
prompt), so `tools_prompt` writes that description in the dialect's own terms (for V3.1 the format its model
card gives). It does not render chats (chat_format.py) nor know the API's shapes (server/).

Parsing (`ToolCallParser`): text before `<｜tool▁calls▁begin｜>` is content; each complete call whose name is
one of the request's tools and whose arguments are a JSON object becomes a ParsedCall; anything else inside the
calls block (a malformed or unknown call, a call cut short by max_tokens) goes back into content as the model
wrote it, so a client never gets a call that is not one, and `finish_reason: "tool_calls"` always comes with
calls. Only the answer is parsed: reasoning is split off first (chat_format.ReasoningParser).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from openr2.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object, as the model wrote it (stripped)


@dataclass(frozen=True)
class ToolCallDialect:
    name: str  # "v3" or "v3.1"

    def call_text(self, name: str, arguments: str) -> str:
        """One call as the model writes it (between and including the call markers)."""
        body = f"function{TOOL_SEP}{name}\n```json\n{arguments}\n```" if self.name == "v3" else \
            f"{name}{TOOL_SEP}{arguments}"
        return TOOL_CALL_BEGIN + body + TOOL_CALL_END

    def calls_text(self, calls: list[tuple[str, str]]) -> str:
        """A whole calls block: (name, arguments) pairs."""
        sep = "\n" if self.name == "v3" else ""
        return TOOL_CALLS_BEGIN + sep.join(self.call_text(n, a) for n, a in calls) + TOOL_CALLS_END

    def calls_grammar(self, tools: list[tuple[str, dict]], token_id: Callable[[str], int | None],
                      max_calls: int | None = None, after_begin: bool = False) -> str:
        """An llguidance Lark grammar of one calls block in this dialect, then nothing more: each call names one
        of `tools` ((name, JSON Schema of its arguments)) with arguments that match that schema; at most
        max_calls calls (None: any number >= 1). Markers that are single tokens are named by id, so text can
        never spell them; after_begin: the block's opening marker was already generated (a trigger token)."""
        def marker(text: str) -> str:
            tid = token_id(text)
            return f"<[{tid}]>" if tid is not None else json.dumps(text)

        alternatives = []
        for i, (name, schema) in enumerate(tools):
            # no free whitespace in the arguments: every token makes progress, whatever the model
            args = "%json" + json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}})
            if self.name == "v3":
                body = f'"function" {marker(TOOL_SEP)} {json.dumps(name + chr(10) + "```json" + chr(10))} {args} ' \
                       f'{json.dumps(chr(10) + "```")}'
            else:
                body = f"{json.dumps(name)} {marker(TOOL_SEP)} {args}"
            alternatives.append(f"call_{i}: {marker(TOOL_CALL_BEGIN)} {body} {marker(TOOL_CALL_END)}")
        sep = '"\\n" ' if self.name == "v3" else ""
        more = "" if max_calls == 1 else f" ({sep}call)*"
        begin = "" if after_begin else marker(TOOL_CALLS_BEGIN) + " "
        lines = [f"start: {begin}call{more} {marker(TOOL_CALLS_END)}",
                 "call: " + " | ".join(f"call_{i}" for i in range(len(tools))), *alternatives]
        return "\n".join(lines)

    @property
    def trigger(self) -> str:
        """The text that opens a calls block (a trigger token for strict tools under tool_choice 'auto')."""
        return TOOL_CALLS_BEGIN

    def probe_text(self, name: str, arguments: str) -> str:
        """What a template that speaks this dialect writes for one past call (chat_format.tool_support)."""
        return self.call_text(name, arguments)

    def tools_prompt(self, tools: list[dict]) -> str:
        return tools_prompt(tools, self)

    def parser(self, tool_names, max_calls: int | None = None) -> ToolCallParser:
        return ToolCallParser(self, tool_names, max_calls)

    def parse_call(self, body: str) -> tuple[str, str] | None:
        """The text between one call's markers -> (name, arguments text), or None if it is not in this dialect."""
        head, sep, rest = body.partition(TOOL_SEP)
        if not sep:
            return None
        if self.name == "v3.1":
            return head.strip(), rest.strip()
        name, newline, args = rest.partition("\n")
        args = args.strip()
        if not newline or not args.startswith("```"):
            return None
        args = args.removeprefix("```json").removeprefix("```").removesuffix("```")
        return name.strip(), args.strip()


V3 = ToolCallDialect("v3")
V31 = ToolCallDialect("v3.1")
DIALECTS = (V3, V31)


def tools_prompt(tools: list[dict], dialect: ToolCallDialect) -> str:
    """The system-prompt text that tells the model its tools (OpenAI's `tools`) and how to call them."""
    parts = ["## Tools", "You have access to the following tools:"]
    for tool in tools:
        fn = tool["function"]
        parts.append(f"### {fn['name']}\nDescription: {fn.get('description', '')}\n\n"
                     f"Parameters: {json.dumps(fn.get('parameters', {}), ensure_ascii=False)}")
    if dialect.name == "v3.1":
        example = (f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}tool_call_name{TOOL_SEP}tool_call_arguments{TOOL_CALL_END}"
                   f"{{{{additional_tool_calls}}}}{TOOL_CALLS_END}")
        rules = "- For multiple tool calls, chain them directly without separators or spaces"
    else:
        example = (f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}tool_call_name\n```json\n"
                   f"tool_call_arguments\n```{TOOL_CALL_END}{TOOL_CALLS_END}")
        rules = "- For multiple tool calls, put each call on its own line inside the same block"
    parts.append("IMPORTANT: ALWAYS adhere to this exact format for tool use:\n" + example + "\n\nWhere:\n\n"
                 "- `tool_call_name` must be an exact match to one of the available tools\n"
                 "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
                 + rules)
    return "\n\n".join(parts)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (a tag maybe cut by a delta)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallParser:
    """Splits an answer into content and tool calls, delta by delta; see the module docstring for the rules.

    feed(delta) and finish() return (content delta, calls completed by this delta); the concatenation over a
    whole answer equals parse(answer). `max_calls` keeps the first calls only (parallel_tool_calls=false); the
    ones past it go back into content like malformed ones.
    """

    def __init__(self, dialect: ToolCallDialect, tool_names, max_calls: int | None = None):
        self.dialect, self.tool_names, self.max_calls = dialect, frozenset(tool_names), max_calls
        self.calls: list[ParsedCall] = []
        self._buf = ""
        self._in_block = False

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        p = type(self)(self.dialect, self.tool_names, self.max_calls)
        c1, calls1 = p.feed(text)
        c2, calls2 = p.finish()
        return c1 + c2, calls1 + calls2

    def feed(self, delta: str) -> tuple[str, list[ParsedCall]]:
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[ParsedCall]]:
        return self._drain(final=True)

    lead = ""  # text right before the block's opening marker that belongs to the block (DSML: a blank line)

    def markers(self) -> tuple[str, str, str, str]:
        """(block open, block close, call open, call close) of the dialect's calls block."""
        return TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END

    def _drain(self, final: bool) -> tuple[str, list[ParsedCall]]:
        begin, end_block, call_open, call_close = self.markers()
        content: list[str] = []
        calls: list[ParsedCall] = []
        while self._buf:
            if not self._in_block:
                i = self._buf.find(begin)
                if i < 0:
                    keep = 0 if final else max(partial_suffix(self._buf, self.lead + begin),
                                               partial_suffix(self._buf, begin))
                    content.append(self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content.append(self._buf[:i].removesuffix(self.lead))
                self._buf, self._in_block = self._buf[i + len(begin):], True
                continue
            head = self._buf.lstrip()
            if head.startswith(end_block):
                self._buf, self._in_block = head[len(end_block):], False
                continue
            if head.startswith(call_open):
                end = head.find(call_close)
                if end < 0:
                    if final:  # cut short: the model's text, not a call
                        content.append(head)
                        self._buf = ""
                    break
                end += len(call_close)
                call = self._call(head[:end])
                if call is None:
                    content.append(head[:end])
                else:
                    calls.append(call)
                    self.calls.append(call)
                self._buf = head[end:]
                continue
            # text inside the block that is no call: back to content, up to the next marker
            marks = [j for j in (head.find(call_open), head.find(end_block)) if j >= 0]
            if marks:
                content.append(head[:min(marks)])
                self._buf = head[min(marks):]
                continue
            if final:
                content.append(head)
                self._buf = ""
            break  # else wait: a marker may still be arriving
        return "".join(content), calls

    def _call(self, text: str) -> ParsedCall | None:
        """One whole call (its markers included) -> a ParsedCall, or None if it is not a valid one."""
        parsed = self.dialect.parse_call(text[len(TOOL_CALL_BEGIN):-len(TOOL_CALL_END)])
        if parsed is None or parsed[0] not in self.tool_names:
            return None
        if self.max_calls is not None and len(self.calls) >= self.max_calls:
            return None
        try:
            args = json.loads(parsed[1])
        except ValueError:
            return None
        return ParsedCall(parsed[0], parsed[1]) if isinstance(args, dict) else None
