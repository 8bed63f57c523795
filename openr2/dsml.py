"""DeepSeek's DSML tool-call format (DeepSeek-V3.2 and V4): how calls are written, read back and constrained.

Both releases ship no jinja chat template, only a Python encoder (`encoding/encoding_dsv32.py`,
`encoding/encoding_dsv4.py`); their calls are XML-like, with one parameter per argument:

    \\n\\n<｜DSML｜BLOCK>
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true">raw text</｜DSML｜parameter>
    <｜DSML｜parameter name="KEY2" string="false">JSON value</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜BLOCK>

BLOCK is `function_calls` in V3.2 and `tool_calls` in V4; `string="true"` marks a string written as is,
anything else is JSON. This module owns that text (`DsmlDialect`: calls, the tools' description, the calls
grammar for constrained decoding) and `DsmlParser`, which reads it back into OpenAI calls whole or delta by
delta with the rules of tool_calls.ToolCallParser: a malformed or unknown call stays content. Rendering whole
conversations is dsml_encoding.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from openr2.tool_calls import ParsedCall, ToolCallParser

DSML = "｜DSML｜"
INVOKE_OPEN, INVOKE_CLOSE = f"<{DSML}invoke", f"</{DSML}invoke>"
PARAM_CLOSE = f"</{DSML}parameter>"
_INVOKE = re.compile(rf'<{DSML}invoke name="([^"]*)">(.*){INVOKE_CLOSE}', re.S)
_PARAM = re.compile(rf'\s*<{DSML}parameter name="([^"]*)" string="(true|false)">(.*?){PARAM_CLOSE}', re.S)

# The tools' description in each release's own words (the encoders' TOOLS_SYSTEM_TEMPLATE / TOOLS_TEMPLATE,
# as their reference outputs show them); {open}/{close} are the calls block's markers.
_V32_TOOLS = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "{open}" block like the following as part of your reply to the user:
{open}
<{dsml}invoke name="$FUNCTION_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$FUNCTION_NAME2">
...
</{dsml}invoke>
{close}

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects \
should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for \
other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking \
block. Here is an example:

{open}
...
{close}

<function_results>
...
</function_results>

<think>...thinking about results</think>

Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""

_V4_TOOLS = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"{open}" block like the following:

{open}
<{dsml}invoke name="$TOOL_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$TOOL_NAME2">
...
</{dsml}invoke>
{close}

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside \
<think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

# a property the model writes as raw text (string="true"): a string with no constraint a grammar would check
_PLAIN_STRING_KEYS = {"type", "description", "title"}


def _to_json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class DsmlDialect:
    name: str  # "v3.2" or "v4"
    block: str  # the calls block's tag: "function_calls" (V3.2) or "tool_calls" (V4)

    @property
    def open(self) -> str:
        return f"<{DSML}{self.block}>"

    @property
    def close(self) -> str:
        return f"</{DSML}{self.block}>"

    @property
    def trigger(self) -> str:
        """The text that opens a calls block (a trigger token only where the vocabulary has it whole)."""
        return self.open

    def call_text(self, name: str, arguments: str) -> str:
        """One invoke as the encoders write it; arguments: the JSON text of an object (OpenAI's shape)."""
        args = json.loads(arguments) if arguments.strip() else {}
        if not isinstance(args, dict):
            raise ValueError(f"tool call {name!r}: arguments must be a JSON object")
        params = "\n".join(f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
                           f'{v if isinstance(v, str) else _to_json(v)}{PARAM_CLOSE}' for k, v in args.items())
        return f'{INVOKE_OPEN} name="{name}">\n{params}\n{INVOKE_CLOSE}'

    def calls_text(self, calls: list[tuple[str, str]]) -> str:
        """A whole calls block as it follows an answer's content: (name, arguments) pairs."""
        return f"\n\n{self.open}\n" + "\n".join(self.call_text(n, a) for n, a in calls) + f"\n{self.close}"

    def probe_text(self, name: str, arguments: str) -> str:
        """What a template that speaks this dialect writes for one past call (chat_format.tool_support)."""
        return self.calls_text([(name, arguments)]).lstrip("\n")

    def tools_prompt(self, tools: list[dict]) -> str:
        """The tools' description (OpenAI's `tools`), as the release's encoder writes it."""
        template = _V32_TOOLS if self.name == "v3.2" else _V4_TOOLS
        schemas = "\n".join(_to_json(t["function"]) for t in tools)
        return template.format(open=self.open, close=self.close, dsml=DSML, schemas=schemas)

    def parser(self, tool_names, max_calls: int | None = None) -> DsmlParser:
        return DsmlParser(self, tool_names, max_calls)

    def calls_grammar(self, tools: list[tuple[str, dict]], token_id: Callable[[str], int | None],
                      max_calls: int | None = None, after_begin: bool = False, free_text: bool = False) -> str:
        """An llguidance Lark grammar of one calls block (as calls_text writes it), then nothing more: each call
        names one of `tools` ((name, JSON Schema of its arguments)) and writes that schema's declared
        properties in order (so a schema without `properties` gets `{}`), required ones always, plain strings
        as raw text without the DSML marker and every other value as JSON under its own schema; at most
        max_calls calls (None: any number >= 1). after_begin: the block's opening marker was already generated
        (a trigger token). free_text (strict tools under tool_choice 'auto'): any text first, and the block
        only if that text opens one: the opening marker is several tokens in the releases' vocabularies, so
        the grammar itself watches for it (whatever tokens spell it) instead of a trigger token. ValueError
        for a schema DSML cannot carry (required properties it does not declare, names with quotes)."""
        def marker(text: str) -> str:
            tid = token_id(text)
            return f"<[{tid}]>" if tid is not None else json.dumps(text)

        # a plain string: any text without the DSML marker (so the parser's first close tag is its own), ended
        # lazily by its close tag
        lines = [f"plain[suffix={json.dumps(PARAM_CLOSE)}]: PLAIN", f"PLAIN: /(?s:.*)/ & ~/(?s:.*{DSML}.*)/"]
        for i, (name, schema) in enumerate(tools):
            if '"' in name:
                raise ValueError(f"tool {name!r}: a DSML tool name cannot hold a quote")
            props = schema.get("properties") or {}
            required = set(schema.get("required") or [])
            if required - set(props):
                raise ValueError(f"tool {name!r}: required properties {sorted(required - set(props))} are not declared")
            params = []
            for key, prop in props.items():
                if '"' in key:
                    raise ValueError(f"tool {name!r}: a DSML parameter name cannot hold a quote")
                plain = isinstance(prop, dict) and prop.get("type") == "string" and set(prop) <= _PLAIN_STRING_KEYS
                head = f'<{DSML}parameter name="{key}" string="{"true" if plain else "false"}">'
                if plain:
                    param = f'{json.dumps(head)} plain "\\n"'
                else:
                    schema_ = {**(prop if isinstance(prop, dict) else {}), "x-guidance": {"whitespace_flexible": False}}
                    param = f'{json.dumps(head)} %json{json.dumps(schema_)} {json.dumps(PARAM_CLOSE + chr(10))}'
                params.append(param if key in required else f"({param})?")
            body = " ".join(params) if params else '"\\n"'
            lines.append(f'call_{i}: {json.dumps(f"{INVOKE_OPEN} name={json.dumps(name)}>" + chr(10))} {body} '
                         f'{json.dumps(INVOKE_CLOSE)}')
        more = "" if max_calls == 1 else ' ("\\n" call)*'
        block = f'"\\n" call{more} "\\n" {marker(self.close)}'
        if free_text:  # text without the opening marker, ended by EOS, or by the marker and then the block
            start = [f"start: free | lead {block}", "free: FREE", f"lead[suffix={json.dumps(self.open)}]: FREE",
                     f"FREE: /(?s:.*)/ & ~/(?s:.*{re.escape(self.open)}.*)/"]
        else:
            begin = "" if after_begin else f'"\\n\\n" {marker(self.open)} '
            start = [f"start: {begin}{block}"]
        return "\n".join([*start, "call: " + " | ".join(f"call_{i}" for i in range(len(tools))), *lines])

    def parse_invoke(self, text: str) -> tuple[str, dict] | None:
        """One whole invoke (markers included) -> (name, arguments), or None if it is not a well-formed one:
        every parameter once, string="false" values valid JSON, nothing else between them."""
        m = _INVOKE.fullmatch(text)
        if m is None:
            return None
        name, body = m.groups()
        args: dict = {}
        pos = 0
        for p in _PARAM.finditer(body):
            if p.start() != pos or p.group(1) in args:
                return None
            key, is_str, value = p.groups()
            if is_str == "true":
                args[key] = value
            else:
                try:
                    args[key] = json.loads(value)
                except ValueError:
                    return None
            pos = p.end()
        return (name, args) if not body[pos:].strip() else None


V32 = DsmlDialect("v3.2", "function_calls")
V4 = DsmlDialect("v4", "tool_calls")
DSML_DIALECTS = (V32, V4)


class DsmlParser(ToolCallParser):
    """Splits an answer into content and DSML calls, delta by delta (tool_calls.ToolCallParser's interface,
    state and block reading, with a DsmlDialect's markers: feed/finish return (content delta, calls completed),
    their concatenation equals parse(answer)). The blank line the encoders put before a calls block belongs to
    the block, not to the content."""

    lead = "\n\n"

    def markers(self) -> tuple[str, str, str, str]:
        return self.dialect.open, self.dialect.close, INVOKE_OPEN, INVOKE_CLOSE

    def _call(self, text: str) -> ParsedCall | None:
        parsed = self.dialect.parse_invoke(text)
        if parsed is None or parsed[0] not in self.tool_names:
            return None
        if self.max_calls is not None and len(self.calls) >= self.max_calls:
            return None
        return ParsedCall(parsed[0], _to_json(parsed[1]))
