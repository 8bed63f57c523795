"""What the served model's chat template can do, and what a chat request asks of it.

Owns `TemplateFeatures`: the thinking modes the template has and the tool-call dialect it writes (both read
once from the template itself, chat_format.thinking_modes / tool_support; a checkpoint with no template but
a model_type whose release ships an encoder, DeepSeek-V3.2 and V4, gets that encoder and its DSML dialect), the template options and messages
of one chat request (`prompt_inputs`: its thinking choice, or the mode its model alias implies, and its tools),
with a 400 naming the parameter when the template cannot do what the request asks, and the parser of the
request's tool calls (`tool_parser`). Rendering itself is chat_format.render_chat's (`render` passes the
model_type); it runs nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from openr2.chat_format import ToolSupport, render_chat, thinking_modes, tool_support, with_tools
from openr2.dsml import DsmlDialect, DsmlParser
from openr2.server.errors import bad_request
from openr2.tool_calls import ToolCallParser

ToolParserFactory = Callable[[], ToolCallParser | DsmlParser]  # a fresh parser per choice


class TemplateFeatures:
    def __init__(self, tokenizer, model_name: str, model_type: str | None = None):
        self.tokenizer, self.model_name, self.model_type = tokenizer, model_name, model_type

    def render(self, messages: list[dict], options: dict) -> str:
        """The prompt text (chat_format.render_chat); ValueError for messages the format refuses."""
        return render_chat(messages, self.tokenizer, model_type=self.model_type, **options)

    @functools.cached_property
    def thinking_modes(self) -> frozenset[bool]:
        """{True}, {False} or both (chat_format.thinking_modes)."""
        return thinking_modes(self.tokenizer, model_type=self.model_type)

    @functools.cached_property
    def tools(self) -> ToolSupport:
        """The tool-call dialect and whether the template describes tools itself (chat_format.tool_support)."""
        return tool_support(self.tokenizer, model_type=self.model_type)

    def prompt_inputs(self, req, implied_thinking: bool | None) -> tuple[list[dict], dict]:
        """(messages, template options) for a chat request (protocol.ChatCompletionRequest)."""
        options = self.thinking_option(req, implied_thinking)
        messages = req.template_messages()
        if req.tools_active:
            if self.tools.dialect is None:
                raise bad_request(f"The model '{self.model_name}' cannot be asked for tool calls: its chat "
                                  f"template has no tool-call format.", "tools")
            messages, tool_options = with_tools(messages, req.tools, self.tools)
            options.update(tool_options)
        return messages, options

    def thinking_option(self, req, implied: bool | None) -> dict:
        """The template's `thinking` option: the request's own choice (a 400 naming its parameter if the
        template has no such mode), else what the model alias implies where the template has that mode, else
        nothing (the template's default); with thinking on, V4's reasoning-effort level from `reasoning_effort`."""
        asked, param = req.thinking_choice()
        modes = self.thinking_modes
        if asked is not None and asked not in modes:
            mode = "thinking" if asked else "non-thinking"
            raise bad_request(f"The model '{self.model_name}' has no {mode} mode: its chat template "
                              f"{'always thinks' if modes == {True} else 'never thinks'}.", param)
        chosen = asked if asked is not None else implied
        options = {} if chosen is None or chosen not in modes else {"thinking": chosen}
        if options.get("thinking") and self.effort_levels and req.reasoning_effort is not None:
            # V4's encoder has two levels, as vLLM maps OpenAI's: "xhigh" / "max" -> max, the others -> high
            options["reasoning_effort"] = "max" if req.reasoning_effort in ("xhigh", "max") else "high"
        return options

    @functools.cached_property
    def effort_levels(self) -> bool:
        """Whether the prompt has reasoning-effort levels: DeepSeek-V4's release encoder (no jinja template)."""
        return self.model_type == "deepseek_v4" and getattr(self.tokenizer, "chat_template", None) is None

    def structured_outputs(self, req):
        """The engine's constraint for a chat request (engine.grammar.StructuredOutputsParams), or None: a
        calls block in the template's dialect for tool_choice 'required' / named (the calls must happen) or for
        `strict` tools under 'auto' (free text until the model opens a calls block, then the block is kept to
        the schemas: a trigger token where the opening marker is one, else, for DSML, a grammar of free text
        that watches for the marker); else response_format's JSON. A 400 names the parameter whose grammar does not compile."""
        from openr2.engine.grammar import StructuredOutputsParams

        forced = req.forced_tools
        strict_auto = req.tools_active and forced is None and any(t["function"].get("strict") for t in req.tools)
        if forced is None and not strict_auto:
            return self.json_outputs(req)
        names = forced if forced is not None else req.tool_names
        schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"}
                   for t in req.tools}
        max_calls = 1 if req.parallel_tool_calls is False or isinstance(req.tool_choice, dict) else None
        dialect = self.tools.dialect
        trigger = self.tokenizer.token_to_id(dialect.trigger) if strict_auto else None
        if strict_auto and trigger is None and not isinstance(dialect, DsmlDialect):
            raise bad_request("strict tools with tool_choice 'auto' need a tokenizer whose tool-call markers "
                              "are special tokens.", "tools")
        tools = [(n, schemas[n]) for n in names]
        if strict_auto and trigger is None:  # DSML: the block's opening is several tokens, the grammar watches
            grammar = dialect.calls_grammar(tools, self.tokenizer.token_to_id, max_calls, free_text=True)
            return _checked(StructuredOutputsParams(grammar=grammar), "tools")
        grammar = dialect.calls_grammar(tools, self.tokenizer.token_to_id, max_calls, after_begin=strict_auto)
        return _checked(StructuredOutputsParams(grammar=grammar, trigger_token_ids=(trigger,) if strict_auto else ()),
                        "tools")

    def json_outputs(self, req):
        """response_format's constraint (chat or completions), or None for free text."""
        from openr2.engine.grammar import StructuredOutputsParams

        schema = req.json_schema
        return None if schema is None else _checked(StructuredOutputsParams(json=schema), "response_format")

    def tool_parser(self, req) -> ToolParserFactory | None:
        """What parses a chat request's tool calls out of each answer; None without tools to call."""
        if not req.tools_active:
            return None
        dialect, names = self.tools.dialect, req.tool_names
        max_calls = 1 if req.parallel_tool_calls is False else None
        return lambda: dialect.parser(names, max_calls)


def _checked(spec, param: str):
    """spec if its grammar compiles, else a 400 naming the request's parameter."""
    from openr2.engine.grammar import check

    try:
        check(spec)
    except ValueError as e:
        raise bad_request(f"The {param} schema cannot be used: {e}", param) from None
    return spec
