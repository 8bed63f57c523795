"""The operator's content policy (`openr2 serve --policy rules.toml`): rules loaded from a file, applied to every
generation through a wrapper around the engine. Off by default: without a file nothing here runs.

Owns the rules file (`Policy.load`: a malformed file is a ValueError naming the file and the rule), checking a
request's prompt before it runs and its answer while it is generated (`PolicyEngine`), and the refusal counter
`openr2_policy_refusals_total{rule,on}` in /metrics. It does not shape responses: a refused choice leaves here as
an engine output with finish_reason "content_filter" and the rule in `stop_reason` (a protocol.ContentFilter),
which outputs.py and anthropic_protocol.py turn into each API's fields.

What the rules see:
  * "request": the prompt as the model reads it (the chat messages rendered by the template, or the completions
    prompt, with a fill-in-the-middle suffix), decoded without special tokens. A refused request never reaches
    the model: its answer is empty and its usage zero (nothing is billed).
  * "answer": everything the model generates for a choice, its thinking included. Pattern rules are checked as
    the text grows (_AnswerWatch): text that may still become part of a match is held back until more text
    decides it, so a stream never carries any part of a match; at a match the choice ends, cut where the match
    starts, and the text sent before it stays sent. Judge rules need the whole answer, so with one on "answer"
    nothing is streamed until the answer is judged. The tokens generated are billed, as for any answer.
  * A judge rule runs the served model itself on the operator's prompt with `{text}` replaced by the text
    (the end of it, when the whole does not fit the context), greedy, at most `judge_max_tokens`; the answer
    (its thinking removed) refuses when `refuse_when` (a regular expression) is found in it. Judge calls are not
    billed to the user: the policy is the operator's, a user cannot see or avoid it, and billing it would make a
    refused request cost more than an allowed one. Their tokens are counted in /metrics as endpoint
    "policy:judge", so the operator sees what the policy costs.
The policy logs no text: a refusal is counted and reported in the response, never written to a log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import regex  # re's syntax, plus partial matches: what a growing answer may still turn into
from prometheus_client import Counter

from openr2.chat_format import ReasoningParser, prompt_opens_reasoning, render_chat
from openr2.engine.engine import CompletionOutput, RequestOutput
from openr2.engine.sampling import SamplingParams
from openr2.engine.usage import Usage
from openr2.server.protocol import ContentFilter

SIDES = ("request", "answer", "both")
_RULE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # a metric label and a JSON value: kept plain
_PATTERN_KEYS = {"id", "applies_to", "patterns", "literal", "case_sensitive", "description"}
_JUDGE_KEYS = {"id", "applies_to", "judge", "refuse_when", "judge_max_tokens", "case_sensitive", "description"}
MAX_JUDGE_TOKENS = 4096  # room for a model that always thinks (R1) to think first


@dataclass(frozen=True)
class Rule:
    id: str
    applies_to: str  # "request", "answer" or "both"
    patterns: tuple[regex.Pattern, ...] = ()
    judge: str | None = None  # the judge prompt, with "{text}" where the text goes
    refuse_when: regex.Pattern | None = None
    judge_max_tokens: int = 16

    def on(self, side: str) -> bool:
        return self.applies_to in (side, "both")

    def first_match(self, text: str, pos: int = 0) -> int | None:
        """Where the earliest match of a pattern (at or after pos) starts, or None."""
        starts = [m.start() for p in self.patterns if (m := p.search(text, pos))]
        return min(starts) if starts else None

    def scan(self, text: str, pos: int) -> tuple[int | None, int | None]:
        """For text that is still growing: (where the earliest settled match starts, where the earliest match that
        more text may still make, unmake or move starts), each None if there is none. A match that reaches the
        end is not settled: `\\bterm\\b` or `term$` may fail once the next word arrives."""
        settled = open_ = None
        for p in self.patterns:
            m = p.search(text, pos, partial=True)
            if m is None or m.start() == len(text):
                continue
            if not m.partial and m.end() < len(text):
                settled = m.start() if settled is None else min(settled, m.start())
            else:
                open_ = m.start() if open_ is None else min(open_, m.start())
        return settled, open_


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    source: str = "policy"

    def patterns(self, side: str) -> list[Rule]:
        return [r for r in self.rules if r.patterns and r.on(side)]

    def judges(self, side: str) -> list[Rule]:
        return [r for r in self.rules if r.judge is not None and r.on(side)]

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a rules file (TOML, `[[rules]]` tables; README "Content policy"); ValueError naming the file and
        the rule for anything wrong, FileNotFoundError when there is no such file."""
        import tomllib  # Python 3.11+, as for --prices in TOML

        path = str(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise
        except OSError as e:  # a directory, no permission: a clear startup error, not a traceback
            raise ValueError(f"{path}: cannot read the rules file: {e.strerror}") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: dict, source: str = "policy") -> Policy:
        unknown = set(data) - {"rules"}
        if unknown:
            raise ValueError(f"{source}: unknown top-level key(s) {sorted(unknown)}; rules go in [[rules]] tables")
        items = data.get("rules")
        if not isinstance(items, list) or not items or not all(isinstance(r, dict) for r in items):
            raise ValueError(f"{source}: no rules; write each as a [[rules]] table")
        rules, seen = [], set()
        for k, item in enumerate(items):
            rule = _rule(item, f"{source}: rule {item.get('id')!r}" if isinstance(item.get("id"), str)
                         else f"{source}: rules[{k}]")
            if rule.id in seen:
                raise ValueError(f"{source}: rule {rule.id!r} is defined twice")
            seen.add(rule.id)
            rules.append(rule)
        return cls(tuple(rules), source)


def _rule(item: dict, where: str) -> Rule:
    rid = item.get("id")
    if not isinstance(rid, str) or not _RULE_ID.fullmatch(rid):
        raise ValueError(f"{where}: 'id' must be 1 to 64 of A-Z, a-z, 0-9, _ . : -")
    side = item.get("applies_to")
    if side not in SIDES:
        raise ValueError(f"{where}: 'applies_to' must be one of {', '.join(SIDES)}, got {side!r}")
    if ("patterns" in item) == ("judge" in item):
        raise ValueError(f"{where}: give either 'patterns' or 'judge'")
    allowed = _PATTERN_KEYS if "patterns" in item else _JUDGE_KEYS
    if set(item) - allowed:  # a misspelt key must not quietly change what a rule does
        raise ValueError(f"{where}: unknown key(s) {sorted(set(item) - allowed)}")
    for key in ("literal", "case_sensitive"):
        if not isinstance(item.get(key, False), bool):
            raise ValueError(f"{where}: '{key}' must be true or false")
    flags = 0 if item.get("case_sensitive") else regex.IGNORECASE
    if "patterns" in item:
        patterns = item["patterns"]
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"{where}: 'patterns' must be a non-empty list of non-empty strings")
        literal = item.get("literal", False)
        compiled = tuple(_compile(regex.escape(p) if literal else p, flags, f"{where}: pattern {p!r}")
                         for p in patterns)
        for p in compiled:  # e.g. "a*" or "\\b": an empty match is found in any text, so it would refuse everything
            if any(m.start() == m.end() for sample in ("", "x", "a b\n1.") for m in p.finditer(sample)):
                raise ValueError(f"{where}: pattern {p.pattern!r} matches empty text, so it would refuse everything")
        return Rule(rid, side, compiled)
    judge, refuse_when = item["judge"], item.get("refuse_when")
    if not isinstance(judge, str) or "{text}" not in judge:
        raise ValueError(f"{where}: 'judge' must be a prompt with {{text}} where the text goes")
    if not isinstance(refuse_when, str) or not refuse_when:
        raise ValueError(f"{where}: a judge rule needs 'refuse_when', a regular expression found in the judge's "
                         f"answer when it refuses (e.g. \"^\\\\W*yes\")")
    max_tokens = item.get("judge_max_tokens", 16)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_JUDGE_TOKENS:
        raise ValueError(f"{where}: 'judge_max_tokens' must be an integer from 1 to {MAX_JUDGE_TOKENS}")
    return Rule(rid, side, judge=judge, judge_max_tokens=max_tokens,
                refuse_when=_compile(refuse_when, flags, f"{where}: refuse_when"))


def _compile(pattern: str, flags: int, where: str) -> regex.Pattern:
    try:
        return regex.compile(pattern, flags)
    except regex.error as e:
        raise ValueError(f"{where} is not a valid regular expression: {e}") from None


class PolicyEngine:
    """The engine's `generate` with the policy applied; every other attribute is the engine's (reads and writes)."""

    def __init__(self, engine, policy: Policy, metrics):
        self._engine, self._policy, self._metrics = engine, policy, metrics
        self._tokenizer = engine.tokenizer
        self._refusals = Counter("openr2_policy_refusals", "Requests and answers refused by the operator's policy.",
                                 ["rule", "on"], registry=metrics.registry)
        for rule in policy.rules:  # every rule's series from 0, so that a rate can be taken from the start
            for side in ("request", "answer"):
                if rule.on(side):
                    self._refusals.labels(rule.id, side)
        for rule in policy.judges("request") + policy.judges("answer"):
            room = engine.max_model_len - rule.judge_max_tokens - len(self._tokenizer.encode(self._judge_prompt(rule, "")))
            if room < 1:
                raise ValueError(f"{policy.source}: rule {rule.id!r}: the judge prompt leaves no room for the text in "
                                 f"the model's context of {engine.max_model_len} tokens")

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __setattr__(self, name, value):  # e.g. cli's on_failure: set on the engine, which calls it
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._engine, name, value)

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       salt: str | None = None, priority: int = 0, restartable: bool = False):
        ids, n = prompt["prompt_token_ids"], params.n if params is not None else 1
        if self._policy.patterns("request") or self._policy.judges("request"):
            text = self._tokenizer.decode(ids, skip_special_tokens=True)
            rule = await self._check(text, "request", request_id, salt, priority)
            if rule is not None:
                self._refusals.labels(rule.id, "request").inc()
                reason = ContentFilter(rule=rule.id, on="request")
                outs = [CompletionOutput(index=i, logprobs=[] if params is not None and params.logprobs is not None
                                         else None, finish_reason="content_filter", stop_reason=reason)
                        for i in range(n)]
                yield RequestOutput(request_id, prompt.get("prompt"), ids, outs, True, Usage(0, 0, 0))
                return
        stream = self._engine.generate(prompt, params, request_id, salt, priority, restartable=restartable)
        try:
            async for out in self._answers(stream, n, request_id, salt, priority):
                yield out
        finally:  # closed early (refused, client gone): abort the engine request, freeing its blocks
            await stream.aclose()

    async def _answers(self, stream, n: int, request_id, salt, priority):
        """The engine's outputs with answer rules applied; held back to the end when a judge must read them."""
        judges = self._policy.judges("answer")
        watch = _AnswerWatch(self._policy.patterns("answer"), n)
        hold = bool(judges)
        out = None
        async for out in stream:
            out = watch.feed(out, self._refusals)
            if watch.all_done:
                break
            if not hold:
                yield out
            else:  # nothing of the answer yet, but the usage: a client gone now is billed for what ran
                yield dataclasses.replace(out, outputs=[_hidden(o) for o in out.outputs])
        if out is None:
            return
        if hold:
            outputs = []
            for o in out.outputs:
                if o.finish_reason != "content_filter":
                    rule = await self._check(o.text, "answer", f"{request_id}-{o.index}", salt, priority,
                                             judges_only=True)
                    if rule is not None:
                        self._refusals.labels(rule.id, "answer").inc()
                        o = dataclasses.replace(o, text="", finish_reason="content_filter",
                                                stop_reason=ContentFilter(rule=rule.id, on="answer"))
                outputs.append(_whole(o))
            out = dataclasses.replace(out, outputs=outputs)
        yield out

    async def _check(self, text: str, side: str, request_id, salt, priority, judges_only: bool = False) -> Rule | None:
        """The first rule (patterns first, then judges, each in file order) that refuses `text`, or None."""
        if not judges_only:
            for rule in self._policy.patterns(side):
                if rule.first_match(text) is not None:
                    return rule
        judges = self._policy.judges(side)
        verdicts = await asyncio.gather(*(self._judge(rule, text, f"{request_id}-policy-{k}", salt, priority)
                                          for k, rule in enumerate(judges)))
        return next((rule for rule, refuses in zip(judges, verdicts) if refuses), None)

    def _judge_prompt(self, rule: Rule, text: str) -> str:
        return render_chat([{"role": "user", "content": rule.judge.replace("{text}", text)}], self._tokenizer,
                           thinking=False)

    async def _judge(self, rule: Rule, text: str, request_id: str, salt, priority) -> bool:
        """Whether the served model, asked the rule's judge prompt about `text`, answers with a refusal."""
        keep = self._engine.max_model_len - rule.judge_max_tokens - len(self._tokenizer.encode(self._judge_prompt(rule, "")))
        ids = self._tokenizer.encode(text)
        if len(ids) > keep:  # the end of the text: a chat's latest turn, an answer's last words
            text = self._tokenizer.decode(ids[len(ids) - keep:])
        prompt = self._judge_prompt(rule, text)
        prompt_ids = self._tokenizer.encode(prompt)
        while len(prompt_ids) > self._engine.max_model_len - rule.judge_max_tokens:  # re-tokenised at the seams
            text = text[len(text) // 8 + 1:]
            prompt = self._judge_prompt(rule, text)
            prompt_ids = self._tokenizer.encode(prompt)
        params = SamplingParams(max_tokens=rule.judge_max_tokens, temperature=0.0)
        last = None
        stream = self._engine.generate({"prompt_token_ids": prompt_ids, "prompt": prompt}, params, request_id, salt,
                                       priority)
        try:
            async for last in stream:  # noqa: B007 (the last output is the verdict)
                pass
        finally:
            await stream.aclose()
            if last is not None:
                self._metrics.count_usage("policy:judge", last.usage)
        _, answer = ReasoningParser(prompt_opens_reasoning(prompt)).parse(last.outputs[0].text)
        return rule.refuse_when.search((answer or "").strip()) is not None


class _AnswerWatch:
    """Pattern rules over the choices of one answer as they grow. Per choice it releases only text that no match
    can start in: text that may still become a match (a partial match, or one that reaches the end) is held back
    until the next output decides it, so the stream never carries any part of a match. A settled match ends the
    choice there (finish_reason "content_filter", its text cut where the match starts)."""

    def __init__(self, rules: list[Rule], n: int):
        self.rules, self.n = rules, n
        self.sent = [0] * n  # characters of each choice's text released so far
        self.ended: dict[int, CompletionOutput] = {}  # choice -> what later outputs show of it, once it is over

    @property
    def all_done(self) -> bool:
        return len(self.ended) == self.n

    def feed(self, out: RequestOutput, refusals) -> RequestOutput:
        outputs = [self._choice(o, refusals) for o in out.outputs]
        return dataclasses.replace(out, outputs=outputs, finished=out.finished or self.all_done)

    def _choice(self, o: CompletionOutput, refusals) -> CompletionOutput:
        i, text = o.index, o.text
        if i in self.ended:  # ended before (by the engine or a rule): nothing more of it goes out
            return self.ended[i]
        cut, rule, release = None, None, len(text)
        for r in self.rules:
            if o.finished:
                settled, open_ = r.first_match(text, self.sent[i]), None
            else:
                settled, open_ = r.scan(text, self.sent[i])
            if settled is not None and (cut is None or settled < cut):
                cut, rule = settled, r
            if open_ is not None:
                release = min(release, open_)
        if rule is not None:
            refusals.labels(rule.id, "answer").inc()
            ended = dataclasses.replace(o, text=text[:cut], text_delta=text[self.sent[i]:cut],
                                        finish_reason="content_filter",
                                        stop_reason=ContentFilter(rule=rule.id, on="answer"))
            self.ended[i] = dataclasses.replace(ended, text_delta="", token_ids_delta=[])
            return ended
        released = dataclasses.replace(o, text=text[:release], text_delta=text[self.sent[i]:release])
        self.sent[i] = release
        if o.finished:
            self.ended[i] = dataclasses.replace(released, text_delta="", token_ids_delta=[])
        return released


def _hidden(o: CompletionOutput) -> CompletionOutput:
    return CompletionOutput(index=o.index, logprobs=[] if o.logprobs is not None else None)


def _whole(o: CompletionOutput) -> CompletionOutput:
    """A held-back choice sent at once: its whole text and tokens as one delta."""
    return dataclasses.replace(o, text_delta=o.text, token_ids_delta=list(o.token_ids))
