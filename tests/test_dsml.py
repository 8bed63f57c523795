"""DeepSeek-V3.2 / V4 DSML: conversations rendered byte for byte as the releases' own test vectors, their calls
read back (whole and in random deltas alike, malformed ones as content) and the calls grammar."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from openr2.chat_format import normalize_messages
from openr2.dsml import DSML, V4, V32, DsmlParser
from openr2.dsml_encoding import encode_v4, encode_v32
from openr2.tokenizer import EOS, THINK_END
from openr2.tool_calls import ParsedCall

DATA = Path(__file__).parent / "data" / "dsml"  # see its README for where each vector comes from


def _case(name: str):
    data = json.loads((DATA / f"{name}_input{'_1' if name == 'v4' else ''}.json").read_text())
    # vLLM's copy of the V4 vector names the reasoning `reasoning`; DeepSeek's API calls it reasoning_content
    msgs = [{("reasoning_content" if k == "reasoning" else k): v for k, v in m.items()} for m in data["messages"]]
    expected = (DATA / f"{name}_output{'_1' if name == 'v4' else ''}.txt").read_text()
    return normalize_messages(msgs), data["tools"], expected


def test_v32_renders_the_release_test_vector():
    messages, tools, expected = _case("v32")
    assert encode_v32(messages, tools, thinking=True) == expected.strip()  # the release's test strips the file


def test_v4_renders_the_release_test_vector():
    messages, tools, expected = _case("v4")
    assert encode_v4(messages, tools, thinking=True) == expected


@pytest.mark.parametrize("case,thinking", [(3, True), (4, False)])
def test_v4_internal_roles_render_the_release_test_vectors(case, thinking):
    """The release's cases 3 (a developer turn with tools after a latest_reminder, thinking, tool results) and 4
    (latest_reminder, an answer the next turn's `action` task follows, chat mode), as vLLM's test renders them."""
    data = json.loads((DATA / f"v4_input_{case}.json").read_text())
    msgs = [{("reasoning_content" if k == "reasoning" else k): v for k, v in m.items()} for m in data]
    assert encode_v4(msgs, thinking=thinking) == (DATA / f"v4_output_{case}.txt").read_text()


def test_v4_reasoning_effort_and_bad_internal_fields():
    from openr2.dsml_encoding import REASONING_EFFORT_MAX

    ask = [{"role": "user", "content": "Hi"}]
    plain = "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>"
    assert encode_v4(ask, thinking=True, reasoning_effort="max") == plain.replace("<｜User｜>", REASONING_EFFORT_MAX
                                                                                  + "<｜User｜>")
    assert encode_v4(ask, thinking=True, reasoning_effort="high") == encode_v4(ask, thinking=True) == plain
    assert encode_v4(ask, thinking=False, reasoning_effort="max").endswith("<｜Assistant｜></think>")  # chat: none
    assert REASONING_EFFORT_MAX not in encode_v4(ask, thinking=False, reasoning_effort="max")
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_v4(ask, reasoning_effort="medium")
    with pytest.raises(ValueError, match="task"):
        encode_v4([{"role": "user", "content": "x", "task": "nope"}])
    with pytest.raises(ValueError, match="developer"):
        encode_v4([{"role": "developer", "content": ""}])
    # a task other than `action` puts its token right after the turn; the answer after a task has no thinking
    rendered = encode_v4([{"role": "user", "content": "x", "task": "title"}, {"role": "assistant", "content": "T"}])
    assert rendered == "<｜begin▁of▁sentence｜><｜User｜>x<｜title｜>T<｜end▁of▁sentence｜>"


def test_generation_prompts_and_chat_mode():
    ask = [{"role": "user", "content": "Hi"}]
    assert encode_v32(ask, thinking=True).endswith("<｜User｜>Hi<｜Assistant｜><think>")
    assert encode_v32(ask, thinking=False).endswith("<｜Assistant｜></think>")
    assert encode_v4(ask, thinking=False) == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>"
    # without tools V4 drops the reasoning of turns before the last question, like V3.2
    two = [*ask, {"role": "assistant", "content": "Hello", "reasoning_content": "greet"},
           {"role": "user", "content": "Bye"}]
    assert "greet" not in encode_v4(two) and "greet" not in encode_v32(two)
    with pytest.raises(ValueError):
        encode_v32([*ask, {"role": "tool", "content": "x"}])  # a result with no call


@pytest.mark.parametrize("name,dialect", [("v32", V32), ("v4", V4)])
def test_the_reference_calls_parse_back_into_their_openai_calls(name, dialect):
    messages, tools, expected = _case(name)
    names = [t["function"]["name"] for t in tools]
    calls_turns = [m for m in messages if m["role"] == "assistant" and m.get("tool_calls")]
    # each calls block of the rendered vector, as the model generated it (after </think>, before EOS)
    blocks = [chunk.split(THINK_END)[-1] for chunk in expected.split(EOS) if dialect.open in chunk]
    assert len(blocks) == len(calls_turns)
    for block, turn in zip(blocks, calls_turns):
        content, calls = DsmlParser(dialect, names).parse(block)
        assert content == ""
        assert [(c.name, json.loads(c.arguments)) for c in calls] == \
            [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in turn["tool_calls"]]


def _answers(dialect):
    calls = dialect.calls_text([("weather", '{"city": "Paris", "days": 3}'), ("time", "{}")])
    got = [ParsedCall("weather", '{"city": "Paris", "days": 3}'), ParsedCall("time", "{}")]
    bad_json = dialect.call_text("weather", "{}").replace("\n\n", f'\n<{DSML}parameter name="days" string="false">'
                                                          f'three</{DSML}parameter>\n')
    return {
        "plain": ("Just text.", "Just text.", []),
        "calls": (calls, "", got),
        "text then calls": ("Let me check." + calls, "Let me check.", got),
        "no blank line": ("Hm " + calls.lstrip("\n"), "Hm ", got),
        "unknown tool": (dialect.calls_text([("nope", "{}"), ("time", "{}")]), dialect.call_text("nope", "{}"),
                         [ParsedCall("time", "{}")]),
        "value not json": (f"\n\n{dialect.open}\n{bad_json}\n{dialect.close}", bad_json, []),
        "cut short": (f"\n\n{dialect.open}\n{dialect.call_text('time', '{}')}\n{DSML}invoke name=",
                      f"{DSML}invoke name=", [ParsedCall("time", "{}")]),
        "stray text in the block": (f"\n\n{dialect.open}\nhmm {dialect.call_text('time', '{}')}\n{dialect.close}",
                                    "hmm ", [ParsedCall("time", "{}")]),
    }


@pytest.mark.parametrize("dialect", [V32, V4], ids=["v3.2", "v4"])
def test_parse_whole_and_in_random_deltas_agree(dialect):
    rng = random.Random(0)
    for name, (text, content, calls) in _answers(dialect).items():
        assert DsmlParser(dialect, ["weather", "time"]).parse(text) == (content, calls), name
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            p = DsmlParser(dialect, ["weather", "time"])
            got_content, got_calls = "", []
            for piece in pieces:
                c, k = p.feed(piece)
                got_content, got_calls = got_content + c, got_calls + k
            c, k = p.finish()
            assert (got_content + c, got_calls + k) == (content, calls), (name, pieces)


def test_parameters_are_typed_by_their_string_attribute():
    args = {"s": "3", "n": 3, "f": 1.5, "b": True, "l": [1, "a"], "o": {"k": None}}
    text = V32.calls_text([("t", json.dumps(args))])
    assert 'name="s" string="true">3<' in text and 'name="n" string="false">3<' in text
    (call,) = DsmlParser(V32, ["t"]).parse(text)[1]
    assert json.loads(call.arguments) == args
    dup = V32.call_text("t", '{"a": "x"}').replace("\n</", f'\n<{DSML}parameter name="a" string="true">y'
                                                           f'</{DSML}parameter>\n</')
    assert V32.parse_invoke(dup) is None  # a parameter given twice is no call


@pytest.mark.parametrize("dialect", [V32, V4], ids=["v3.2", "v4"])
def test_the_calls_grammar_takes_exactly_the_calls_the_parser_reads(dialect):
    import llguidance

    from openr2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "openr2" / "assets" / "openr2-demo")
    lltok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_token_id)
    tools = [("weather", {"type": "object", "properties": {"city": {"type": "string"},
                                                           "days": {"type": "integer", "minimum": 1}},
                          "required": ["city"]}), ("time", {"type": "object"})]

    def accepts(text: str, max_calls=None) -> bool:
        grammar = llguidance.LLMatcher.grammar_from_lark(dialect.calls_grammar(tools, tok.token_to_id, max_calls))
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        return matcher.consume_tokens(tok.encode(text) + [tok.eos_token_id]) and matcher.is_stopped()

    two = [("weather", '{"city": "Paris", "days": 2}'), ("time", "{}")]
    assert accepts(dialect.calls_text(two)) and accepts(dialect.calls_text([("weather", '{"city": "Oslo"}')]))
    parsed = DsmlParser(dialect, ["weather", "time"]).parse(dialect.calls_text(two))[1]
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == [(n, json.loads(a)) for n, a in two]
    assert not accepts(dialect.calls_text(two), max_calls=1) and accepts(dialect.calls_text(two[:1]), max_calls=1)
    assert accepts(dialect.calls_text([("weather", '{"city": "a < b </x>"}')]))  # raw text, markup included
    assert not accepts(dialect.calls_text([("weather", '{"city": "a </｜DSML｜invoke> b"}')]))  # not DSML's
    assert not accepts(dialect.calls_text([("weather", '{"days": 2}')]))  # a required argument missing
    assert not accepts(dialect.calls_text([("weather", '{"city": "Paris", "days": 0}')]))  # off the schema
    assert not accepts(dialect.calls_text([("weather", '{"city": "Paris", "town": "x"}')]))  # undeclared
    assert not accepts(dialect.calls_text([("other", "{}")]))  # a tool that was not offered
    assert not accepts("Sure." + dialect.calls_text(two[:1]))  # nothing before the calls
    other = V4 if dialect is V32 else V32
    assert not accepts(other.calls_text(two[:1]))  # only the checkpoint's own block
    with pytest.raises(ValueError):
        dialect.calls_grammar([("t", {"type": "object", "required": ["x"]})], tok.token_to_id)


@pytest.mark.parametrize("dialect", [V32, V4], ids=["v3.2", "v4"])
def test_strict_tools_under_auto_free_text_then_every_opened_block_validates(dialect):
    """tool_choice 'auto' with strict tools (free_text=True): text with no calls block ends freely; once the
    model spells the multi-token opening marker (in whatever tokens: here split at a random point, so the
    tokens differ from the tokenizer's own), the grammar takes over and the arguments always validate. The
    "model" is random logits at every step (temperature 1 and greedy), sampled through the engine's masks."""
    import jsonschema
    import torch

    from openr2.engine.grammar import GrammarCompiler, StructuredOutputsParams
    from openr2.engine.sampling import SamplingParams, sample
    from openr2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "openr2" / "assets" / "openr2-demo")
    schemas = {"weather": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                            "days": {"type": "integer", "minimum": 1, "maximum": 9},
                                                            "units": {"enum": ["C", "F"]}},
                           "required": ["city", "days"], "additionalProperties": False},
               "time": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 4}}}}
    grammar = dialect.calls_grammar(list(schemas.items()), tok.token_to_id, free_text=True)
    compiler = GrammarCompiler(tok, tok.vocab_size, prefetch=False)
    compiled = compiler.compile(StructuredOutputsParams(grammar=grammar))
    text = tok.encode("Let me check that.")
    state = compiler.state(compiled, [])
    for t in text + [tok.eos_token_id]:  # free text, no block: the answer may end
        assert state.masks([]).blocked(tok.vocab_size)[0, t] == 0
        state.advance(t)
    rng = random.Random(0)
    calls_seen = 0
    for trial in range(10):
        state = compiler.state(compiled, [])
        cut = rng.randrange(1, len(dialect.open))
        opening = tok.encode("Sure.\n\n" + dialect.open[:cut]) + tok.encode(dialect.open[cut:])
        params = SamplingParams(temperature=0 if trial % 4 == 0 else 1.0)
        gen = torch.Generator().manual_seed(trial)
        out = []
        for step in range(600):
            mask = state.masks([])
            if step < len(opening):  # the "model" writes the opening marker
                token = opening[step]
                assert not mask.blocked(tok.vocab_size)[0, token]
            else:
                logits = torch.randn(1, tok.vocab_size, generator=gen) * 3
                token = int(sample(logits, [params], [gen], blocked=[mask]).token_ids[0])
            if token == tok.eos_token_id:
                break
            state.advance(token)
            out.append(token)
        assert token == tok.eos_token_id and state.matcher.is_stopped(), trial
        content, calls = DsmlParser(dialect, schemas).parse(tok.decode(out))
        assert content == "Sure." and calls, trial
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        calls_seen += len(calls)
    assert calls_seen >= 10


def test_v4_merges_results_into_one_user_turn_in_call_order():
    calls = [{"id": i, "type": "function", "function": {"name": "t", "arguments": "{}"}} for i in ("a", "b")]
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "b", "content": "B"}, {"role": "tool", "tool_call_id": "a", "content": "A"},
            {"role": "user", "content": "and?"}]
    assert encode_v4(msgs, thinking=False).endswith(
        "<｜User｜><tool_result>A</tool_result>\n\n<tool_result>B</tool_result>\n\nand?<｜Assistant｜></think>")


def test_a_template_less_checkpoint_gets_its_release_format_and_a_template_wins():
    from openr2.chat_format import render_chat, thinking_modes, tool_support
    from openr2.tokenizer import Tokenizer
    from openr2.tool_calls import V3
    from tests.tokenizer_utils import tiny_tokenizer

    with_template = tiny_tokenizer()
    bare = Tokenizer(with_template.backend, with_template.bos_token, with_template.eos_token,
                     with_template.eos_token, None)
    for model_type, dialect in (("deepseek_v32", V32), ("deepseek_v4", V4)):
        support = tool_support(bare, model_type=model_type)
        assert support.dialect is dialect and support.renders_tools
        assert thinking_modes(bare, model_type=model_type) == {True, False}
        assert dialect.open in render_chat([{"role": "user", "content": "Hi"}], bare, model_type=model_type,
                                           tools=[{"type": "function", "function": {"name": "t"}}])
    # a checkpoint's own template (V3.2-Exp ships one) is what its model writes: it wins over the model_type
    assert tool_support(with_template, model_type="deepseek_v32").dialect is V3
    assert tool_support(bare).dialect is V3  # no template, no encoder: the built-in R1 format


def test_the_eval_backend_renders_a_template_less_v32_checkpoint_as_the_server_does():
    import dataclasses

    from openr2.engine.engine import EngineConfig, LLMEngine
    from openr2.eval.backends import LocalBackend, Request
    from openr2.model.transformer import build_model
    from openr2.presets import tiny_v32
    from openr2.tokenizer import Tokenizer
    from tests.tokenizer_utils import tiny_tokenizer

    tok = tiny_tokenizer()
    bare = Tokenizer(tok.backend, tok.bos_token, tok.eos_token, tok.eos_token, None)
    config = dataclasses.replace(tiny_v32(), vocab_size=bare.vocab_size, num_nextn_predict_layers=0,
                                 eos_token_id=bare.eos_token_id, bos_token_id=bare.bos_token_id)
    engine = LLMEngine(build_model(config, seed=0), bare, EngineConfig(block_size=16, num_blocks=64))
    messages = [{"role": "user", "content": "2+2?"}]
    ((_, done),) = LocalBackend(engine).run([Request("a", 0, messages, 0.0, 1.0, 1, 0)])
    assert done.usage.prompt_tokens == len(bare.encode(encode_v32(messages, thinking=False)))
