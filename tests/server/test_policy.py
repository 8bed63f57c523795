"""The operator's content policy (`serve --policy`) through HTTP with the official openai and anthropic clients.

Answer rules are checked against an oracle that does not share the implementation: the same greedy request on a
server without a policy gives the whole answer, and the policied answer must be its text up to the first
occurrence (str.find) of a rule's term. A judge on the tiny random model cannot be predicted, so its plumbing is
tested with `refuse_when` expressions that force the verdict (always / never); the judge's reading of a real
answer ("yes" / "no", the text inserted into its prompt) runs on the scripted engine, which answers like a judge.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry, Counter

from openr2.cli import main
from openr2.engine.engine import CompletionOutput, RequestOutput
from openr2.engine.usage import Usage
from openr2.server.app import ServerConfig
from openr2.server.metrics import Metrics
from openr2.server.policy import Policy, PolicyEngine, _AnswerWatch
from tests.server._live import free_port, serve, stop
from tests.server._scripted import serve_scripted
from tests.tokenizer_utils import tiny_tokenizer

CHAT = [{"role": "user", "content": "Tell me a story."}]
GREEDY = {"temperature": 0, "max_tokens": 16}
NO_THINKING = {"thinking": {"type": "disabled"}, "ignore_eos": True}


def _openai(base_url: str, strict: bool = True) -> openai.OpenAI:
    # (the SDK's Completion type has no null finish_reason, which a streamed completion's chunks carry: not strict)
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, _strict_response_validation=strict)


def _config(policy: Policy | None = None) -> ServerConfig:
    return ServerConfig(model_name="tiny", default_max_tokens=16, policy=policy)


def _term(text: str) -> str:
    """A 3-character piece from the middle of `text` whose first occurrence is there (not at the start)."""
    for at in range(max(1, len(text) // 2), len(text) - 2):
        if text.lower().find(text[at:at + 3].lower()) == at:
            return text[at:at + 3]
    raise AssertionError(f"no usable term in {text!r}")


def _cut(text: str, terms: dict[str, str]) -> tuple[str, str]:
    """(text up to the earliest term, that term's rule): what the policy must leave of an answer."""
    at, rule = min((text.lower().find(t.lower()), r) for r, t in terms.items() if t.lower() in text.lower())
    return text[:at], rule


def _refusals(base_url: str) -> dict[tuple[str, str], float]:
    found = re.findall(r'openr2_policy_refusals_total\{on="(\w+)",rule="([^"]+)"\} (\S+)',
                       httpx.get(base_url + "/metrics").text)
    return {(rule, on): float(v) for on, rule, v in found}


def _billed(server) -> tuple[int, int, int, int]:
    """(requests, prompt tokens, completion tokens, cost) the ledger holds."""
    rows = server.ledger.usage_report()
    row = rows[0] if rows else {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_pico_usd": 0}
    return row["requests"], row["prompt_tokens"], row["completion_tokens"], row["cost_pico_usd"]


def _judge_tokens(base_url: str) -> float:
    m = re.search(r'openr2_prompt_tokens_total\{endpoint="policy:judge"\} (\S+)', httpx.get(base_url + "/metrics").text)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def baseline(ckpt, tmp_path_factory):
    """The greedy answers of a server without a policy (which must show no trace of one)."""
    with serve(ckpt, tmp_path_factory.mktemp("plain"), _config()) as (base_url, server):
        client = _openai(base_url)
        chat = client.chat.completions.create(model="tiny", messages=CHAT, **GREEDY, extra_body=NO_THINKING)
        text = client.completions.create(model="tiny", prompt="Once upon a time", **GREEDY,
                                         extra_body={"ignore_eos": True})
        msg = anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0).messages.create(
            model="tiny", max_tokens=16, messages=CHAT, thinking={"type": "disabled"}, extra_body={"temperature": 0})
        return {"chat": chat.choices[0].message.content, "text": text.choices[0].text,
                "messages": msg.content[0].text, "wrapped": isinstance(server.engine, PolicyEngine),
                "metrics": httpx.get(base_url + "/metrics").text,
                "fields": [chat.choices[0].model_dump(), text.choices[0].model_dump(), msg.model_dump()],
                "ends": (chat.choices[0].finish_reason, text.choices[0].finish_reason, msg.stop_reason)}


def test_without_a_policy_nothing_changes(baseline):
    assert not baseline["wrapped"] and "openr2_policy" not in baseline["metrics"]
    assert "policy:judge" not in baseline["metrics"]
    assert all("content_filter" not in fields for fields in baseline["fields"])
    assert baseline["ends"][:2] == ("length", "length") and baseline["ends"][2] in ("end_turn", "max_tokens")


@pytest.fixture(scope="module")
def patterns(ckpt, baseline, tmp_path_factory):
    """(base_url, server, terms): a request rule, and an answer rule per endpoint cutting its baseline mid-way."""
    terms = {"cut-chat": _term(baseline["chat"]), "cut-text": _term(baseline["text"])}
    if len(baseline["messages"]) >= 4:
        terms["cut-messages"] = _term(baseline["messages"])
    rules = [{"id": "open-sesame", "applies_to": "request", "patterns": ["open sesame"], "literal": True},
             *({"id": rid, "applies_to": "answer", "patterns": [term], "literal": True} for rid, term in terms.items())]
    policy = Policy.from_dict({"rules": rules})
    with serve(ckpt, tmp_path_factory.mktemp("patterns"), _config(policy)) as (base_url, server):
        yield base_url, server, terms


def test_a_request_pattern_refuses_before_the_model_runs(patterns):
    base_url, server, _ = patterns
    before, billed = _refusals(base_url), _billed(server)
    assert before[("open-sesame", "request")] == 0 and ("open-sesame", "answer") not in before
    client = _openai(base_url)
    ask = [{"role": "user", "content": "Please OPEN Sesame now"}]  # literal, case-insensitive by default
    chat = client.chat.completions.create(model="tiny", messages=ask, max_tokens=8)
    choice = chat.choices[0]
    assert choice.finish_reason == "content_filter" and choice.message.content == ""
    assert choice.model_extra["content_filter"] == {"rule": "open-sesame", "on": "request"}
    assert chat.usage.prompt_tokens == chat.usage.completion_tokens == 0  # never ran: nothing billed
    chunks = list(client.chat.completions.create(model="tiny", messages=ask, max_tokens=8, stream=True))
    assert [c.choices[0].finish_reason for c in chunks] == [None, "content_filter"]
    assert chunks[-1].choices[0].model_extra["content_filter"] == {"rule": "open-sesame", "on": "request"}
    text = client.completions.create(model="tiny", prompt="and then: open sesame", max_tokens=8, n=2)
    assert [(c.finish_reason, c.text, c.model_extra["content_filter"]["rule"]) for c in text.choices] == \
        [("content_filter", "", "open-sesame")] * 2
    msg = anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0).messages.create(
        model="tiny", max_tokens=8, messages=ask)
    assert msg.stop_reason == "refusal" and msg.model_extra["content_filter"] == {"rule": "open-sesame",
                                                                                   "on": "request"}
    assert _refusals(base_url)[("open-sesame", "request")] == 4  # counted per refused request, by rule
    assert _billed(server) == (billed[0] + 4, 0, 0, 0)  # recorded, at no cost


def test_an_answer_pattern_cuts_chat_at_its_match_streamed_and_not(patterns, baseline):
    base_url, _, terms = patterns
    expected, rule = _cut(baseline["chat"], terms)
    client = _openai(base_url)
    chat = client.chat.completions.create(model="tiny", messages=CHAT, **GREEDY, extra_body=NO_THINKING)
    choice = chat.choices[0]
    assert (choice.message.content, choice.finish_reason) == (expected, "content_filter")
    assert choice.model_extra["content_filter"] == {"rule": rule, "on": "answer"}
    assert 1 <= chat.usage.completion_tokens <= 16  # billed for what was generated up to the cut
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, **GREEDY, extra_body=NO_THINKING,
                                                 stream=True, stream_options={"include_usage": True}))
    sent = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sent == expected and len(finals) == 1 and finals[0].finish_reason == "content_filter"
    assert finals[0].model_extra["content_filter"] == {"rule": rule, "on": "answer"}
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_an_answer_pattern_cuts_completions_streamed_and_not(patterns, baseline):
    base_url, server, terms = patterns
    expected, rule = _cut(baseline["text"], terms)
    before = _refusals(base_url)[(rule, "answer")]
    client = _openai(base_url)
    text = client.completions.create(model="tiny", prompt="Once upon a time", **GREEDY, extra_body={"ignore_eos": True})
    assert (text.choices[0].text, text.choices[0].finish_reason) == (expected, "content_filter")
    assert text.choices[0].model_extra["content_filter"] == {"rule": rule, "on": "answer"}
    chunks = list(_openai(base_url, strict=False).completions.create(
        model="tiny", prompt="Once upon a time", **GREEDY, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert chunks[-1].choices[0].model_extra["content_filter"] == {"rule": rule, "on": "answer"}
    assert _refusals(base_url)[(rule, "answer")] == before + 2


def test_an_answer_pattern_ends_anthropic_messages_with_refusal(patterns, baseline):
    base_url, _, terms = patterns
    if "cut-messages" not in terms:
        pytest.fail(f"the tiny model's greedy message is too short to cut: {baseline['messages']!r}")
    expected, rule = _cut(baseline["messages"], terms)
    client = anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0)
    ask = dict(model="tiny", max_tokens=16, messages=CHAT, thinking={"type": "disabled"}, extra_body={"temperature": 0})
    msg = client.messages.create(**ask)
    assert (msg.content[0].text, msg.stop_reason) == (expected, "refusal")
    assert msg.model_extra["content_filter"] == {"rule": rule, "on": "answer"} and msg.usage.output_tokens >= 1
    with client.messages.stream(**ask) as stream:
        sent = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert sent == expected and final.stop_reason == "refusal"
    body = {"model": "tiny", "max_tokens": 16, "messages": CHAT, "thinking": {"type": "disabled"}, "temperature": 0,
            "stream": True}
    frames = [f.split("\n") for f in httpx.post(base_url + "/v1/messages", json=body).text.split("\n\n") if f]
    delta = next(json.loads(f[1].removeprefix("data: ")) for f in frames if f[0] == "event: message_delta")
    assert delta["delta"] == {"stop_reason": "refusal", "stop_sequence": None,
                              "content_filter": {"rule": rule, "on": "answer"}}


def test_batch_lines_go_through_the_same_rules(patterns):
    base_url, _, _ = patterns
    client = _openai(base_url)
    lines = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": text}]}}
             for cid, text in (("refused", "open sesame, please"), ("allowed", "Hello"))]
    upload = client.files.create(file=("b.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()),
                                 purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.time() + 60
    while batch.status not in ("completed", "failed") and time.time() < deadline:
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    out = {x["custom_id"]: x["response"]["body"]["choices"][0]
           for x in map(json.loads, client.files.content(batch.output_file_id).text.splitlines())}
    assert out["refused"]["finish_reason"] == "content_filter"
    assert out["refused"]["content_filter"] == {"rule": "open-sesame", "on": "request"}
    assert "content_filter" not in out["allowed"] or out["allowed"]["content_filter"]["on"] == "answer"


@pytest.fixture(scope="module")
def judges(ckpt, tmp_path_factory):
    """Judge rules whose verdicts are forced: the request judge never refuses, the answer judge always does."""
    policy = Policy.from_dict({"rules": [
        {"id": "judge-request", "applies_to": "request", "judge": "Is this text harmful? {text}",
         "refuse_when": "(?!)"},  # matches nothing: the judge runs, its answer allows
        {"id": "judge-answer", "applies_to": "answer", "judge": "Is this answer harmful? {text}",
         "refuse_when": "^", "judge_max_tokens": 4}]})  # matches any answer: refuses
    with serve(ckpt, tmp_path_factory.mktemp("judges"), _config(policy)) as running:
        yield running


def test_a_judge_runs_on_the_served_model_unbilled_and_an_answer_judge_holds_the_stream(judges):
    base_url, server = judges
    client = _openai(base_url)
    judged, billed = _judge_tokens(base_url), _billed(server)
    chat = client.chat.completions.create(model="tiny", messages=CHAT, **GREEDY, extra_body=NO_THINKING)
    choice = chat.choices[0]
    assert (choice.message.content, choice.finish_reason) == ("", "content_filter")
    assert choice.model_extra["content_filter"] == {"rule": "judge-answer", "on": "answer"}
    assert chat.usage.completion_tokens == 16  # the answer is billed; the two judge calls are not
    assert _billed(server)[:3] == (billed[0] + 1, billed[1] + chat.usage.prompt_tokens, billed[2] + 16)
    assert _judge_tokens(base_url) > judged + chat.usage.prompt_tokens  # both judges read a prompt of their own
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, **GREEDY, extra_body=NO_THINKING,
                                                 stream=True))
    assert all(not (c.choices[0].delta.content or c.choices[0].delta.reasoning_content) for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert _refusals(base_url)[("judge-answer", "answer")] == 2
    assert _refusals(base_url)[("judge-request", "request")] == 0


def judge_script(prompt: str) -> str:
    """A judge that reads its prompt: "yes" when the text it is shown speaks of cats; else a plain answer."""
    if "JUDGE-REQUEST" in prompt or "JUDGE-ANSWER" in prompt:
        return "Yes." if "cat" in prompt.split("does it mention cats?", 1)[1].lower() else "no"
    return "Cats are fine pets." if "pets" in prompt else "Dogs are loyal."


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    policy = Policy.from_dict({"rules": [
        {"id": "no-cats-asked", "applies_to": "request", "judge": "JUDGE-REQUEST: does it mention cats? {text}",
         "refuse_when": r"^\W*yes\b"},
        {"id": "no-cats-said", "applies_to": "answer", "judge": "JUDGE-ANSWER: does it mention cats? {text}",
         "refuse_when": r"^\W*yes\b"}]})
    with serve_scripted(tiny_tokenizer(), judge_script, tmp_path_factory.mktemp("data"),
                        ServerConfig(model_name="tiny", policy=policy)) as running:
        yield running


def test_the_judges_answer_decides(scripted):
    base_url, _, engine = scripted
    client = _openai(base_url)
    asked = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "I love my cat"}],
                                           extra_body=NO_THINKING)
    assert asked.choices[0].model_extra["content_filter"] == {"rule": "no-cats-asked", "on": "request"}
    assert "JUDGE-REQUEST" in engine.prompts[-1] and "I love my cat" in engine.prompts[-1]
    fine = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Which dog?"}],
                                          extra_body=NO_THINKING)
    assert (fine.choices[0].message.content, fine.choices[0].finish_reason) == ("Dogs are loyal.", "stop")
    assert "content_filter" not in fine.choices[0].model_dump()
    said = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Good pets?"}],
                                          extra_body=NO_THINKING)
    assert (said.choices[0].message.content, said.choices[0].finish_reason) == ("", "content_filter")
    assert said.choices[0].model_extra["content_filter"] == {"rule": "no-cats-said", "on": "answer"}
    assert "JUDGE-ANSWER" in engine.prompts[-1] and "Cats are fine pets." in engine.prompts[-1]


@pytest.mark.parametrize("rules, complaint", [
    ([{"id": "x", "applies_to": "answer"}], "rule 'x': give either 'patterns' or 'judge'"),
    ([{"id": "x", "applies_to": "answer", "patterns": ["(unclosed"]}], "rule 'x': pattern '(unclosed' is not"),
    ([{"id": "x", "applies_to": "everything", "patterns": ["a"]}], "rule 'x': 'applies_to' must be"),
    ([{"id": "x", "applies_to": "answer", "pattern": ["a"]}], "rule 'x': give either"),
    ([{"id": "x", "applies_to": "answer", "patterns": ["a"], "case": True}], "rule 'x': unknown key(s) ['case']"),
    ([{"id": "x", "applies_to": "request", "judge": "no placeholder", "refuse_when": "yes"}], "rule 'x': 'judge'"),
    ([{"id": "x", "applies_to": "request", "judge": "{text}"}], "rule 'x': a judge rule needs 'refuse_when'"),
    ([{"id": "x", "applies_to": "answer", "patterns": ["a"]}] * 2, "rule 'x' is defined twice"),
    ([{"id": "has space", "applies_to": "answer", "patterns": ["a"]}], "rule 'has space': 'id' must be"),
    ([{"applies_to": "answer", "patterns": ["a"]}], "rules[0]: 'id' must be"),
    ([], "no rules"),
    ([{"id": "x", "applies_to": "request", "patterns": ["ok", "n*"]}], "rule 'x': pattern 'n*' matches empty text"),
    ([{"id": "x", "applies_to": "request", "patterns": [r"\b"]}], r"rule 'x': pattern '\\b' matches empty text"),
])
def test_a_malformed_rule_is_named(rules, complaint):
    with pytest.raises(ValueError) as e:
        Policy.from_dict({"rules": rules}, "rules.toml")
    assert str(e.value).startswith("rules.toml: ") and complaint in str(e.value)


def test_serve_with_a_bad_rules_file_exits_2_naming_file_and_rule(tmp_path, capsys):
    bad = tmp_path / "rules.toml"
    bad.write_text('[[rules]]\nid = "no-pii"\napplies_to = "answer"\npatterns = ["[0-9"]\n')
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--policy", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: rule 'no-pii': pattern '[0-9' is not a valid regular expression" in err
    assert "Traceback" not in err
    bad.write_text("[[rules]\n")
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--policy", str(bad)]) == 2
    assert f"{bad}: not valid TOML" in capsys.readouterr().err
    bad.write_bytes(b'[[rules]]\nid = "\xff"\n')
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--policy", str(bad)]) == 2
    assert f"{bad}: not valid TOML" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--policy", str(tmp_path)]) == 2
    assert f"{tmp_path}: cannot read the rules file" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--policy", str(tmp_path / "none.toml")]) == 2
    assert "none.toml" in capsys.readouterr().err


def test_the_readme_example_loads_as_documented(tmp_path):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    example = tmp_path / "rules.toml"
    example.write_text(readme.split("# rules.toml, for `openr2 serve", 1)[1].split("```", 1)[0].split("\n", 1)[1])
    keys, judge = Policy.load(example).rules
    assert (keys.id, keys.applies_to, judge.id, judge.applies_to) == ("no-keys", "both", "no-medical-diagnosis",
                                                                       "request")
    assert keys.first_match("my key is SK-" + "a" * 24) == 10 and keys.first_match("sk-short") is None
    assert judge.refuse_when.search("Yes, it does.") and not judge.refuse_when.search("No, yes-men aside")
    assert judge.judge_max_tokens == 8 and judge.judge.endswith("\n\n{text}")


def test_a_judge_prompt_that_leaves_no_room_in_the_context_is_a_startup_error():
    from tests.server._scripted import ScriptedEngine

    policy = Policy.from_dict({"rules": [{"id": "long-judge", "applies_to": "answer", "refuse_when": "yes",
                                          "judge": "Please judge this text carefully. " * 4 + "{text}"}]}, "rules.toml")
    with pytest.raises(ValueError, match=r"^rules.toml: rule 'long-judge': the judge prompt leaves no room"):
        PolicyEngine(ScriptedEngine(tiny_tokenizer(), str, max_model_len=32), policy, Metrics())
    PolicyEngine(ScriptedEngine(tiny_tokenizer(), str, max_model_len=4096), policy, Metrics())  # fits: fine


@pytest.mark.slow
def test_openr2_serve_with_a_rules_file(ckpt, tmp_path):
    """The command as an operator runs it: the file read, the rules applied and counted, SIGTERM ends it."""
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rules]]\nid = "no-sesame"\napplies_to = "request"\npatterns = ["sesame"]\n')
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "openr2", "serve", "--model", str(ckpt), "--port", str(port),
                             "--data-dir", str(tmp_path / "data"), "--served-model-name", "tiny", "--no-compile",
                             "--policy", str(rules)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        ask = [{"role": "user", "content": "Open Sesame!"}]
        choice = _openai(base_url).chat.completions.create(model="tiny", messages=ask, max_tokens=4).choices[0]
        assert choice.finish_reason == "content_filter"
        assert choice.model_extra["content_filter"] == {"rule": "no-sesame", "on": "request"}
        assert _refusals(base_url) == {("no-sesame", "request"): 1.0}
    finally:
        stop(proc)


def _watched(patterns: list[str], deltas: list[str]) -> list[CompletionOutput]:
    """The choice outputs an answer rule over `patterns` lets out, fed the text `deltas` (the last one finishes)."""
    rule = Policy.from_dict({"rules": [{"id": "r", "applies_to": "answer", "patterns": patterns}]}).rules[0]
    watch, text, seen = _AnswerWatch([rule], 1), "", []
    refusals = Counter("x", "x", ["rule", "on"], registry=CollectorRegistry())
    for k, delta in enumerate(deltas):
        text += delta
        out = CompletionOutput(index=0, text=text, text_delta=delta,
                               finish_reason="stop" if k == len(deltas) - 1 else None)
        seen.append(watch.feed(RequestOutput("r", None, [1], [out], out.finished, Usage(1, 0, k + 1)),
                               refusals).outputs[0])
        if watch.all_done:
            break
    return seen


def test_no_part_of_a_match_is_ever_streamed():
    seen = _watched(["open sesame"], ["Say open", " ses", "ame", " now", "."])
    # "open", "open ses" and "open sesame" (a match at the end may yet change) held until the next text decides
    assert [o.text_delta for o in seen] == ["Say ", "", "", ""]
    assert (seen[-1].text, seen[-1].finish_reason, seen[-1].stop_reason.rule) == ("Say ", "content_filter", "r")


def test_text_that_turns_out_not_to_match_is_released_whole():
    seen = _watched([r"\bass\b", "open sesame"], ["an ass", "istant, open", " sea", "!"])
    assert "".join(o.text_delta for o in seen) == seen[-1].text == "an assistant, open sea!"
    assert [o.text_delta for o in seen] == ["an ", "assistant, ", "open sea", "!"] and seen[-1].finish_reason == "stop"


def test_an_end_anchor_is_decided_at_the_real_end():
    assert _watched([r"done\.$"], ["I am done.", " Or not."])[-1].finish_reason == "stop"
    seen = _watched([r"done\.$"], ["I am", " done."])
    assert (seen[-1].text, seen[-1].finish_reason) == ("I am ", "content_filter")
