"""Chat format: built-in renderer vs DeepSeek-R1's real template and our jinja twin, SFT masks, reasoning."""

from __future__ import annotations

from pathlib import Path

import pytest

from openr2.chat_format import (
    ReasoningParser,
    ToolSupport,
    count_reasoning_tokens,
    encode_chat,
    encode_chat_for_training,
    fim_prompt,
    has_fim,
    prompt_opens_reasoning,
    render_chat,
    thinking_modes,
    tool_support,
    with_tools,
)
from openr2.tokenizer import (
    ASSISTANT,
    BOS,
    DEFAULT_CHAT_TEMPLATE,
    EOS,
    FIM_BEGIN,
    FIM_END,
    FIM_HOLE,
    THINK_END,
    THINK_START,
    TOOL_CALLS_BEGIN,
    TOOL_OUTPUTS_BEGIN,
    TOOL_OUTPUTS_END,
    USER,
    train_bpe,
)
from tests.tokenizer_utils import corpus, tiny_tokenizer

# deepseek-ai/DeepSeek-R1 tokenizer_config.json "chat_template", verbatim (see the report in this PR).
R1_TEMPLATE = (Path(__file__).parent / "data" / "deepseek_r1_chat_template.jinja").read_text(encoding="utf-8")


def _call(name, args, call_id="c1"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


U, A = "user", "assistant"
CONVERSATIONS = {
    "single": [{"role": U, "content": "Hi"}],
    "system_multi_turn": [{"role": "system", "content": "Be brief."}, {"role": U, "content": "2+2?"},
                          {"role": A, "content": "4"}, {"role": U, "content": "and 3+3?"}],
    "two_systems": [{"role": "system", "content": "S1"}, {"role": U, "content": "Q"},
                    {"role": "system", "content": "S2"}],
    "think_in_content": [{"role": U, "content": "Q1"}, {"role": A, "content": "<think>\nhmm\n</think>\n\nA1"},
                         {"role": U, "content": "Q2"}, {"role": A, "content": "r2</think>A2"},
                         {"role": U, "content": "Q3"}],
    "reasoning_content": [{"role": U, "content": "Q"}, {"role": A, "content": "A", "reasoning_content": "secret"},
                          {"role": U, "content": "Q2", "reasoning_content": None}],
    "content_parts": [{"role": U, "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]}],
    "unicode": [{"role": U, "content": "漢字 🦀 café"}, {"role": A, "content": "✓"}],
    "one_tool_round": [{"role": U, "content": "Weather in Paris and Rome?"},
                       {"role": A, "content": None, "tool_calls": [_call("weather", '{"city": "Paris"}'),
                                                                  _call("weather", '{"city": "Rome"}', "c2")]},
                       {"role": "tool", "tool_call_id": "c1", "content": "18C"},
                       {"role": "tool", "tool_call_id": "c2", "content": "25C"},
                       {"role": A, "content": "Paris 18C, Rome 25C."}, {"role": U, "content": "Thanks"}],
    "tool_call_with_text": [{"role": U, "content": "Time?"},
                            {"role": A, "content": "Let me check.", "tool_calls": [_call("clock", "{}")]},
                            {"role": "tool", "content": "12:00"}],  # ends in tool output: no generation prompt
}
# Where DeepSeek-R1's template has bugs (see chat_format._render_builtin), we render differently on purpose.
DIFFERENT_FROM_R1 = {
    "two_tool_rounds": [{"role": U, "content": "Q"}, {"role": A, "content": None, "tool_calls": [_call("f", "{}")]},
                        {"role": "tool", "content": "1"}, {"role": A, "content": None, "tool_calls": [_call("g", "{}")]},
                        {"role": "tool", "content": "2"}, {"role": A, "content": "done"}],
    "think_in_tool_turns": [{"role": U, "content": "Q"},
                            {"role": A, "content": "<think>plan</think>Calling.", "tool_calls": [_call("f", "{}")]},
                            {"role": "tool", "content": "1"}, {"role": A, "content": "<think>check</think>done"}],
    "user_after_tool": [{"role": U, "content": "Q"}, {"role": A, "tool_calls": [_call("f", "{}")]},
                        {"role": "tool", "content": "1"}, {"role": U, "content": "next"}],
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_builtin_matches_real_r1_template(name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ours == render_chat(messages, template=R1_TEMPLATE, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("name", [*CONVERSATIONS, *DIFFERENT_FROM_R1])
@pytest.mark.parametrize("thinking", [True, False])
def test_builtin_matches_our_jinja_template(name, thinking, tok):
    messages = {**CONVERSATIONS, **DIFFERENT_FROM_R1}[name]
    ours = render_chat(messages, thinking=thinking)
    assert ours == render_chat(messages, template=DEFAULT_CHAT_TEMPLATE, thinking=thinking)
    assert ours == render_chat(messages, tok, thinking=thinking)  # the tokenizer carries that template


def test_known_shapes_and_documented_differences():
    assert render_chat([{"role": "user", "content": "Hi"}]) == f"{BOS}{USER}Hi{ASSISTANT}{THINK_START}\n"
    assert render_chat([{"role": "user", "content": "Hi"}], thinking=False) == f"{BOS}{USER}Hi{ASSISTANT}"
    ours = render_chat(DIFFERENT_FROM_R1["two_tool_rounds"])
    real = render_chat(DIFFERENT_FROM_R1["two_tool_rounds"], template=R1_TEMPLATE)
    assert ours.count(TOOL_CALLS_BEGIN) == ours.count(TOOL_OUTPUTS_BEGIN) == ours.count(TOOL_OUTPUTS_END) == 2
    assert real.count(TOOL_CALLS_BEGIN) == real.count(TOOL_OUTPUTS_BEGIN) == real.count(TOOL_OUTPUTS_END) == 1
    assert TOOL_OUTPUTS_END + USER in render_chat(DIFFERENT_FROM_R1["user_after_tool"])
    ours = render_chat(DIFFERENT_FROM_R1["think_in_tool_turns"])
    real = render_chat(DIFFERENT_FROM_R1["think_in_tool_turns"], template=R1_TEMPLATE)
    assert "plan" not in ours and "check" not in ours and "plan" in real and "check" in real
    assert "secret" not in render_chat(CONVERSATIONS["reasoning_content"])
    assert "hmm" not in render_chat(CONVERSATIONS["think_in_content"])
    assert f"{ASSISTANT}\n\nA1{EOS}" in render_chat(CONVERSATIONS["think_in_content"])  # R1 keeps those newlines


def test_encode_chat(tok):
    messages = CONVERSATIONS["system_multi_turn"]
    ids = encode_chat(messages, tok)
    assert ids == tok.encode(render_chat(messages)) and ids[0] == tok.bos_token_id
    assert ids[-3:-1] == [tok.token_to_id(ASSISTANT), tok.token_to_id(THINK_START)]
    assert tok.decode(ids[-3:]) == f"{ASSISTANT}{THINK_START}\n"


def test_transformers_renders_r1_template_like_us(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for name, messages in CONVERSATIONS.items():
        if name in ("one_tool_round", "content_parts"):
            continue  # transformers drops content=None and passes parts as a list: the template cannot render those
        assert hf.apply_chat_template(messages, chat_template=R1_TEMPLATE, tokenize=False, add_generation_prompt=True) \
            == render_chat(messages, template=R1_TEMPLATE), name


def test_jinja_environment_like_transformers():
    with pytest.raises(ValueError, match="no tools here"):
        render_chat([{"role": U, "content": "x"}], template="{{ raise_exception('no tools here') }}")
    out = render_chat([{"role": U, "content": "<é>"}], template="{{ messages[0] | tojson }}")
    assert out == '{"role": "user", "content": "<é>"}'  # no HTML escaping, no ASCII escaping
    assert render_chat([{"role": U, "content": "x"}], template="{% for m in messages %}\n{{ m.content }}\n{% endfor %}") == "x\n"
    with pytest.raises(ValueError, match="chat_template"):
        render_chat([{"role": U, "content": "x"}], template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="syntax"):
        render_chat([{"role": U, "content": "x"}], template="{% if %}")


def test_template_by_name(tok):
    named = type(tok)(tok.backend, chat_template=[{"name": "default", "template": "D"},
                                                  {"name": "tool_use", "template": "T{{ bos_token }}"}])
    assert render_chat([{"role": U, "content": "x"}], named) == "D"
    assert render_chat([{"role": U, "content": "x"}], named, template="tool_use") == "T" + BOS


@pytest.mark.parametrize("message, field", [
    ({"role": "wizard", "content": "x"}, r"messages\[1\]\.role"),
    ({"role": U}, r"messages\[1\]\.content"),
    ({"role": A, "content": None}, r"messages\[1\]\.content"),
    ({"role": U, "content": [{"type": "image_url", "image_url": {}}]}, r"messages\[1\]\.content\[0\]"),
    ({"role": U, "content": 5}, r"messages\[1\]\.content"),
    ({"role": A, "tool_calls": [{"function": {}}]}, r"messages\[1\]\.tool_calls\[0\]\.function\.name"),
    ({"role": A, "content": "x", "reasoning_content": 3}, r"messages\[1\]\.reasoning_content"),
    ("just text", r"messages\[1\]"),
])
def test_bad_messages_name_the_field(message, field):
    with pytest.raises(ValueError, match=field):
        render_chat([{"role": U, "content": "ok"}, message])
    with pytest.raises(ValueError, match="messages"):
        render_chat("hello")


def test_developer_role_is_system():
    assert render_chat([{"role": "developer", "content": "S"}, {"role": U, "content": "Q"}]).startswith(BOS + "S" + USER)


# ------------------------------------------------------------------------------------------- training masks

def _masked_text(tok, ids, mask, value):
    return tok.decode([i for i, m in zip(ids, mask) if m == value])


def test_training_mask_reasoning_content(tok):
    history = CONVERSATIONS["system_multi_turn"]
    messages = history + [{"role": A, "content": "6", "reasoning_content": "3+3 is 6"}]
    ids, mask = encode_chat_for_training(messages, tok)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    prompt_len = mask.index(1)
    assert ids[:prompt_len] == encode_chat(history, tok)  # exactly what the engine will see
    assert all(mask[prompt_len:])  # one contiguous completion
    assert _masked_text(tok, ids, mask, 1) == f"3+3 is 6\n{THINK_END}\n\n6{EOS}"
    assert ids[-1] == tok.eos_token_id and mask[-1] == 1


def test_training_mask_think_in_content_and_modes(tok):
    history = [{"role": U, "content": "Q"}]
    for content in ("<think>\nr\n</think>\n\nA", "r\n</think>\n\nA", "r</think>A"):
        ids, mask = encode_chat_for_training(history + [{"role": A, "content": content}], tok)
        assert _masked_text(tok, ids, mask, 1) == f"r\n{THINK_END}\n\nA{EOS}"
    ids, mask = encode_chat_for_training(history + [{"role": A, "content": "A"}], tok)  # no reasoning at all
    assert _masked_text(tok, ids, mask, 1) == f"\n{THINK_END}\n\nA{EOS}"
    ids, mask = encode_chat_for_training(history + [{"role": A, "content": "<think>r</think>A"}], tok, thinking=False)
    assert _masked_text(tok, ids, mask, 1) == f"A{EOS}"
    assert _masked_text(tok, ids, mask, 0) == f"{BOS}{USER}Q{ASSISTANT}"


def test_training_mask_all_turns_and_tools(tok):
    messages = CONVERSATIONS["system_multi_turn"] + [{"role": A, "content": "6"}]
    ids, mask = encode_chat_for_training(messages, tok, train_on_all_turns=True)
    assert _masked_text(tok, ids, mask, 1) == f"4{EOS}\n{THINK_END}\n\n6{EOS}"
    # After tool outputs the prompt does not open <think>, so the model writes the tags itself.
    tools = CONVERSATIONS["tool_call_with_text"] + [{"role": A, "content": "Noon.", "reasoning_content": "r"}]
    ids, mask = encode_chat_for_training(tools, tok)
    assert _masked_text(tok, ids, mask, 1) == f"{THINK_START}\nr\n{THINK_END}\n\nNoon.{EOS}"
    assert _masked_text(tok, ids, mask, 0).endswith(TOOL_OUTPUTS_END)
    with pytest.raises(ValueError, match="last message"):
        encode_chat_for_training([{"role": U, "content": "Q"}], tok)


# ------------------------------------------------------------------------------------------- reasoning

PARSE_CASES = [  # (starts_in_reasoning, output, reasoning, content)
    (True, "step 1\nstep 2\n</think>\n\nThe answer is 4.", "step 1\nstep 2", "The answer is 4."),
    (True, "<think>\nr\n</think>\n\nA", "r", "A"),  # a leading <think> is accepted too
    (True, "\n</think>\n\nA", "", "A"),
    (True, "still thinking when cut off\n", "still thinking when cut off", ""),  # no </think>: all reasoning
    (True, "a </th b", "a </th b", ""),
    (True, "<thinking aloud", "<thinking aloud", ""),
    (False, "<think>\nr1\nr2\n</think>\n\nA\n</think> <think>", "r1\nr2", "A\n</think> <think>"),
    (False, "\n<think>r</think>A", "r", "A"),
    (False, "<think>cut off", "cut off", ""),
    (False, "Plain answer, no reasoning.\n", None, "Plain answer, no reasoning.\n"),
    (False, "<thin", None, "<thin"),
    (False, "\n\nA <think>x</think>", None, "A <think>x</think>"),
    (False, "", None, ""),
    (True, "", "", ""),
    (True, "r\r\n</think>\r\n\r\nA", "r", "A"),
    (True, "x</think></think>y", "x", "</think>y"),
]


def _stream(parser, pieces):
    r, c = [], []
    for piece in pieces:
        dr, dc = parser.feed(piece)
        r.append(dr)
        c.append(dc)
    dr, dc = parser.finish()
    return r + [dr], c + [dc]


def _splits(text):
    yield [text]
    yield list(text)  # 1-char deltas
    yield [text[i:i + 2] for i in range(0, len(text), 2)]  # 2-char deltas, both phases
    yield [text[:1]] + [text[i:i + 2] for i in range(1, len(text), 2)]
    for i in range(len(text) + 1):  # every cut into two deltas
        yield [text[:i], text[i:]]


@pytest.mark.parametrize("starts, text, reasoning, content", PARSE_CASES)
def test_reasoning_parser(starts, text, reasoning, content):
    assert ReasoningParser(starts_in_reasoning=starts).parse(text) == (reasoning, content)
    for pieces in _splits(text):
        parser = ReasoningParser(starts_in_reasoning=starts)
        r, c = _stream(parser, pieces)
        assert ("".join(r) if parser.saw_reasoning else None, "".join(c)) == (reasoning, content), pieces
        assert not any(THINK_END in d for d in r)  # a tag, even cut over deltas, is never emitted as text
        seen_content = False
        for dr, dc in zip(r, c):  # reasoning ends before content starts
            assert not (seen_content and dr)
            seen_content |= bool(dc)


def test_tag_split_across_deltas():
    p = ReasoningParser(starts_in_reasoning=True)
    assert p.feed("I add.\n</th") == ("I add.", "")
    assert p.feed("ink>\n\n4") == ("", "4")
    assert p.finish() == ("", "")
    p = ReasoningParser()
    assert p.feed("<thi") == ("", "")
    assert p.feed("nk>\nx") == ("x", "")


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning(render_chat([{"role": U, "content": "Q"}]))
    assert not prompt_opens_reasoning(render_chat([{"role": U, "content": "Q"}], thinking=False))
    assert not prompt_opens_reasoning(render_chat(CONVERSATIONS["tool_call_with_text"]))


def test_count_reasoning_tokens(tok):
    end, start = tok.token_to_id(THINK_END), tok.token_to_id(THINK_START)
    out = tok.encode(f"r1 r2\n{THINK_END}\n\nA{EOS}")
    n = count_reasoning_tokens(out, end, starts_in_reasoning=True)
    assert tok.decode(out[:n]) == f"r1 r2\n{THINK_END}"
    assert count_reasoning_tokens(tok.encode("cut off"), end) == len(tok.encode("cut off"))
    assert count_reasoning_tokens(tok.encode("A"), end, starts_in_reasoning=False, think_start_id=start) == 0
    led = tok.encode(f"{THINK_START}r{THINK_END}A")
    assert count_reasoning_tokens(led, end, starts_in_reasoning=False, think_start_id=start) == led.index(end) + 1
    assert count_reasoning_tokens([], end) == 0


# The generation prompt of DeepSeek-V3.1's template, reduced to its thinking switch (our own few lines):
# `<｜Assistant｜><think>` in thinking mode, `<｜Assistant｜></think>` otherwise, non-thinking by default.
V31_SWITCH = ("{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}"
              "<｜Assistant｜>{% if thinking is defined and thinking %}<think>{% else %}</think>{% endif %}")


def test_thinking_modes_are_read_from_the_template():
    tok = tiny_tokenizer()
    assert thinking_modes(tok) == {True, False}  # the built-in format's twin: the switch works
    assert thinking_modes(None) == {True, False}  # the built-in renderer itself
    assert thinking_modes(tok, R1_TEMPLATE) == {True}  # R1 always opens <think>, whatever `thinking` says
    assert thinking_modes(tok, V31_SWITCH) == {True, False}
    assert thinking_modes(tok, "{{ bos_token }}<｜Assistant｜>") == {False}  # a template without reasoning


def test_fim_prompt_uses_deepseeks_fim_tokens_and_needs_them():
    from tokenizers import AddedToken

    tok = tiny_tokenizer()
    assert not has_fim(tok)
    with pytest.raises(ValueError, match="fill-in-the-middle"):
        fim_prompt("def f(", "):", tok)
    fim = train_bpe(corpus(), vocab_size=512)
    fim.backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in (FIM_BEGIN, FIM_HOLE, FIM_END)])
    assert has_fim(fim)
    text = fim_prompt("def f(", "):\n    return x", fim)
    assert text == BOS + FIM_BEGIN + "def f(" + FIM_HOLE + "):\n    return x" + FIM_END
    ids = fim.encode(text)
    assert [fim.token_to_id(t) for t in (BOS, FIM_BEGIN)] == ids[:2] and ids[-1] == fim.token_to_id(FIM_END)
    assert fim.token_to_id(FIM_HOLE) in ids  # each marker is one id, never spelled out in bytes


# A template in DeepSeek-V3.1's tool dialect that also lists `tools` itself (our own few lines).
V31_TOOLS = ("{{ bos_token }}{% if tools %}TOOLS:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}{% endif %}"
             "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
             "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{% if m['tool_calls'] %}<｜tool▁calls▁begin｜>"
             "{% for c in m['tool_calls'] %}<｜tool▁call▁begin｜>{{ c['function']['name'] }}<｜tool▁sep｜>"
             "{{ c['function']['arguments'] }}<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜>"
             "{% else %}{{ m['content'] }}{% endif %}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}<｜Assistant｜></think>{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather of a city",
                                           "parameters": {"type": "object"}}}]


def test_tool_support_reads_the_dialect_from_the_template():
    from openr2.tool_calls import V3, V31

    tok = tiny_tokenizer()
    assert tool_support(None) == tool_support(tok) == ToolSupport(V3, False)  # built-in format and its twin
    assert tool_support(tok, R1_TEMPLATE) == ToolSupport(V3, False)  # R1 writes V3 calls, lists no tools
    assert tool_support(tok, V31_TOOLS) == ToolSupport(V31, True)
    assert tool_support(tok, V31_SWITCH).dialect is None  # a template that never writes calls


def test_with_tools_shows_them_through_the_template_or_a_system_message():
    from openr2.tool_calls import V3, V31

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    shown, options = with_tools(msgs, TOOLS, ToolSupport(V3, False))
    assert options == {} and shown[0] == msgs[0] and shown[2] == msgs[1]
    assert shown[1]["role"] == "system" and "### weather" in shown[1]["content"]
    prompt = render_chat(shown, tiny_tokenizer())
    assert prompt.startswith(BOS + "Be brief.\n\n## Tools") and "### weather" in prompt
    same, options = with_tools(msgs, TOOLS, ToolSupport(V31, True))
    assert same == msgs and options == {"tools": TOOLS}
    assert "TOOLS:weather;" in render_chat(same, tiny_tokenizer(), template=V31_TOOLS, **options)
