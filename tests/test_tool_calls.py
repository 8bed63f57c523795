"""Tool-call dialects and their parser: whole and delta by delta give the same split, malformed calls stay text."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from openr2.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP
from openr2.tool_calls import V3, V31, ParsedCall, ToolCallParser, tools_prompt

WEATHER = json.dumps({"city": "Paris"})
TIME = json.dumps({"zone": "UTC"})


def test_each_dialect_writes_and_reads_its_own_calls():
    assert V3.call_text("weather", WEATHER) == \
        f"{TOOL_CALL_BEGIN}function{TOOL_SEP}weather\n```json\n{WEATHER}\n```{TOOL_CALL_END}"
    assert V31.call_text("weather", WEATHER) == f"{TOOL_CALL_BEGIN}weather{TOOL_SEP}{WEATHER}{TOOL_CALL_END}"
    assert V3.calls_text([("a", "{}"), ("b", "{}")]).count("\n" + TOOL_CALL_BEGIN) == 1
    assert V31.calls_text([("a", "{}"), ("b", "{}")]).count(TOOL_CALL_END + TOOL_CALL_BEGIN) == 1
    for dialect in (V3, V31):
        body = dialect.call_text("weather", WEATHER)[len(TOOL_CALL_BEGIN):-len(TOOL_CALL_END)]
        assert dialect.parse_call(body) == ("weather", WEATHER)
    assert V3.parse_call(f"weather{TOOL_SEP}{WEATHER}") is None  # a V3.1 call is no V3 call
    assert V31.parse_call("no separator") is None


def test_tools_prompt_names_every_tool_and_the_exact_format():
    tools = [{"type": "function", "function": {"name": "weather", "description": "Weather of a city",
                                               "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "time"}}]
    for dialect in (V3, V31):
        text = tools_prompt(tools, dialect)
        assert "### weather\nDescription: Weather of a city" in text and "### time" in text
        assert '{"type": "object"}' in text and TOOL_CALLS_BEGIN in text and TOOL_CALLS_END in text
    assert f"tool_call_name{TOOL_SEP}tool_call_arguments" in tools_prompt(tools, V31)
    assert f"function{TOOL_SEP}tool_call_name\n```json" in tools_prompt(tools, V3)


def _answers(dialect):
    calls = dialect.calls_text([("weather", WEATHER), ("time", TIME)])
    return {
        "plain": ("Just text.", "Just text.", []),
        "calls": (calls, "", [ParsedCall("weather", WEATHER), ParsedCall("time", TIME)]),
        "text then calls": ("Let me check. " + calls, "Let me check. ",
                            [ParsedCall("weather", WEATHER), ParsedCall("time", TIME)]),
        "unknown tool": (dialect.calls_text([("nope", "{}"), ("time", TIME)]),
                         dialect.call_text("nope", "{}"), [ParsedCall("time", TIME)]),
        "not json": (dialect.calls_text([("weather", "{city: Paris")]), dialect.call_text("weather", "{city: Paris"),
                     []),
        "not an object": (dialect.calls_text([("weather", "[1]")]), dialect.call_text("weather", "[1]"), []),
        "cut short": (TOOL_CALLS_BEGIN + dialect.call_text("time", TIME) + TOOL_CALL_BEGIN + "weather",
                      TOOL_CALL_BEGIN + "weather", [ParsedCall("time", TIME)]),
        "stray text in the block": (TOOL_CALLS_BEGIN + "hmm " + dialect.call_text("time", TIME) + TOOL_CALLS_END,
                                    "hmm ", [ParsedCall("time", TIME)]),
    }


@pytest.mark.parametrize("dialect", [V3, V31], ids=["v3", "v3.1"])
def test_parse_whole_and_in_random_deltas_agree(dialect):
    rng = random.Random(0)
    for name, (text, content, calls) in _answers(dialect).items():
        parser = ToolCallParser(dialect, ["weather", "time"])
        assert parser.parse(text) == (content, calls), name
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            p = ToolCallParser(dialect, ["weather", "time"])
            got_content, got_calls = "", []
            for piece in pieces:
                c, k = p.feed(piece)
                got_content, got_calls = got_content + c, got_calls + k
            c, k = p.finish()
            assert (got_content + c, got_calls + k) == (content, calls), (name, pieces)


def test_a_call_is_given_out_as_soon_as_it_is_complete_and_max_calls_keeps_the_first():
    text = V31.calls_text([("weather", WEATHER), ("time", TIME)])
    first = text.index(TOOL_CALL_END) + len(TOOL_CALL_END)
    p = ToolCallParser(V31, ["weather", "time"])
    assert p.feed(text[:first]) == ("", [ParsedCall("weather", WEATHER)])
    assert p.feed(text[first:]) == ("", [ParsedCall("time", TIME)])
    one = ToolCallParser(V31, ["weather", "time"], max_calls=1)
    assert one.parse(text) == (V31.call_text("time", TIME), [ParsedCall("weather", WEATHER)])


@pytest.mark.parametrize("dialect", [V3, V31])
def test_the_calls_grammar_takes_exactly_the_calls_the_parser_reads(dialect):
    import llguidance

    from openr2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "openr2" / "assets" / "openr2-demo")
    lltok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_token_id)
    tools = [("weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}), ("time", {"type": "object"})]

    def accepts(text: str, max_calls=None) -> bool:
        grammar = llguidance.LLMatcher.grammar_from_lark(dialect.calls_grammar(tools, tok.token_to_id, max_calls))
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        return matcher.consume_tokens(tok.encode(text) + [tok.eos_token_id]) and matcher.is_stopped()

    two = [("weather", '{"city":"Paris"}'), ("time", '{"zone":"UTC"}')]
    assert accepts(dialect.calls_text(two))
    assert ToolCallParser(dialect, ["weather", "time"]).parse(dialect.calls_text(two))[1] == [ParsedCall(*c) for c in two]
    assert not accepts(dialect.calls_text(two), max_calls=1) and accepts(dialect.calls_text(two[:1]), max_calls=1)
    assert not accepts(dialect.calls_text([("weather", '{"town":"Paris"}')]))  # arguments off the schema
    assert not accepts(dialect.calls_text([("other", "{}")]))  # a tool that was not offered
    assert not accepts("Sure. " + dialect.calls_text(two[:1]))  # nothing before the calls
    other = V31 if dialect is V3 else V3
    assert not accepts(other.calls_text(two[:1]))  # only the template's own dialect
