"""Schemathesis against the live server's /openapi.json: generated requests to every route, valid by the
schema (positive) and not (negative), must never produce a 5xx nor break a stream.

The schema is tightened first so that valid cases name the served model and keep every sampling value in
the server's own ranges: they pass validation and reach the engine (most answer 200), instead of stopping
at a 400 the way untyped schema fields would make them. About 1,100 cases, under a minute on two busy
cores. OPENR2_FUZZ_SCALE multiplies every operation's count for a deeper run, e.g.
    OPENR2_FUZZ_SCALE=10 .venv/bin/python -m pytest -q -s tests/server/test_fuzz.py
and OPENR2_FUZZ_POLICY=1 runs it through a content policy (`serve --policy`) that refuses often.
"""

from __future__ import annotations

import copy
import os
import re

import httpx
import pytest

from openr2.server.app import ServerConfig
from tests.server._live import serve_tiny

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

pytestmark = pytest.mark.slow

SCALE = float(os.environ.get("OPENR2_FUZZ_SCALE", "1"))
# (path, method, positive examples, negative examples); no negatives where nothing can be made invalid
# (no parameters, or only a path parameter, which is any string)
OPERATIONS = [
    ("/v1/chat/completions", "POST", 360, 180),
    ("/v1/completions", "POST", 260, 130),
    ("/v1/models", "GET", 5, 0),
    ("/v1/models/{model_id}", "GET", 15, 0),
    ("/v1/files", "POST", 20, 12),
    ("/v1/files", "GET", 10, 8),
    ("/v1/files/{file_id}", "GET", 5, 0),
    ("/v1/files/{file_id}", "DELETE", 5, 0),
    ("/v1/files/{file_id}/content", "GET", 5, 0),
    ("/v1/batches", "POST", 20, 12),
    ("/v1/batches", "GET", 10, 8),
    ("/v1/batches/{batch_id}", "GET", 5, 0),
    ("/v1/batches/{batch_id}/cancel", "POST", 5, 0),
    ("/v1/messages", "POST", 240, 120),
    ("/v1/messages/count_tokens", "POST", 40, 20),
    ("/v1/usage", "GET", 15, 12),
    ("/v1/user/balance", "GET", 3, 0),
    ("/v1/prices", "GET", 3, 0),
    ("/health", "GET", 3, 0),
]
VOCAB = 338  # the tiny checkpoint's tokenizer


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _number(low: float, high: float, exclusive_low: bool = False) -> dict:
    bound = {"exclusiveMinimum": low} if exclusive_low else {"minimum": low}
    return _nullable({"type": "number", **bound, "maximum": high})


def _ints(low: int, high: int) -> dict:
    """Integers as an enum: for "type": "integer" the generator also makes integral floats such as 2.0,
    which the server refuses with a 400, as OpenAI does."""
    return {"enum": list(range(low, high + 1))}


def _int(low: int, high: int) -> dict:
    return _nullable(_ints(low, high))


_TEXT = {"type": "string", "maxLength": 200}
_PROMPT = {"type": "string", "minLength": 1, "maxLength": 200}  # an empty prompt is a 400
_STOP = {"type": "string", "minLength": 1, "maxLength": 8}
_TOOL = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,20}$"}, "description": {"type": "string", "maxLength": 40},
    "parameters": {"type": "object", "maxProperties": 2}, "strict": {"type": "boolean"}}}
_IDS = {"type": "array", "minItems": 1, "maxItems": 20, "items": _ints(0, VOCAB - 1)}
# the server's ranges (engine/sampling.py, protocol.py), small where size costs time on the tiny model
SAMPLING = {
    "model": {"type": "string", "enum": ["tiny"]},
    "n": _int(1, 3), "max_tokens": _int(1, 4), "temperature": _number(0, 2), "top_p": _number(0, 1, True),
    "top_k": _int(-1, 50), "min_p": _number(0, 1), "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2), "repetition_penalty": _number(0, 2, True),
    "seed": _nullable({"enum": [0, 1, -1, 2**31, -(2**63), 2**63 - 1, 2**64 - 1]}),  # the edges of [-2**63, 2**64)
    "stop": {"anyOf": [_STOP, {"type": "array", "maxItems": 4, "items": _STOP}, {"type": "null"}]},
    "stop_token_ids": _nullable({"type": "array", "maxItems": 4, "items": _ints(0, VOCAB - 1)}),
    "stream_options": _nullable({"type": "object", "properties": {"include_usage": {"type": "boolean"}}}),
}
CHAT = {
    "messages": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]}, "content": _TEXT}}},
    "max_completion_tokens": _int(1, 4), "logprobs": _nullable({"type": "boolean"}), "top_logprobs": _int(0, 4),
    "response_format": _nullable({"type": "object", "required": ["type"],
                                  "properties": {"type": {"enum": ["text", "json_object"]}}}),
    "tools": _nullable({"type": "array", "maxItems": 2, "items": {
        "type": "object", "required": ["type", "function"], "properties": {
            "type": {"const": "function"}, "function": _TOOL}}}),
    "tool_choice": {"enum": [None, "none", "auto", "required"]}, "parallel_tool_calls": _nullable({"type": "boolean"}),
    "thinking": _nullable({"type": "object", "required": ["type"],
                           "properties": {"type": {"enum": ["enabled", "disabled"]}}}),
    "chat_template_kwargs": _nullable({"type": "object", "properties": {"thinking": {"type": "boolean"}}}),
    "reasoning_effort": {"enum": [None, "none", "minimal", "low", "medium", "high", "xhigh", "max"]},
}
# Anthropic's Messages API: content is text or blocks, text blocks valid and any other object too (the
# translation must answer whatever a block holds with a 400, never a 500)
_BLOCKS = {"type": "array", "maxItems": 3, "items": {"anyOf": [
    {"type": "object", "required": ["type", "text"], "properties": {"type": {"const": "text"}, "text": _TEXT}},
    {"type": "object"}]}}
MESSAGES = {
    "model": {"type": "string", "enum": ["tiny"]}, "max_tokens": _ints(1, 4),
    "messages": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"enum": ["user", "assistant"]}, "content": {"anyOf": [_TEXT, _BLOCKS]}}}},
    "system": {"anyOf": [_TEXT, _BLOCKS, {"type": "null"}]},
    "stop_sequences": _nullable({"type": "array", "maxItems": 4, "items": _STOP}),
    "temperature": _number(0, 1), "top_p": _number(0, 1, True), "top_k": _int(-1, 50),
    "thinking": _nullable({"type": "object", "required": ["type"],
                           "properties": {"type": {"enum": ["disabled", "adaptive"]}}}),
    "tools": _nullable({"type": "array", "maxItems": 2, "items": {
        "type": "object", "required": ["name"], "properties": {
            "name": _TOOL["properties"]["name"], "description": _TOOL["properties"]["description"],
            "input_schema": {"type": "object", "maxProperties": 2}}}}),
    "output_config": _nullable({"type": "object", "properties": {
        "effort": {"enum": ["low", "high", "max"]}}, "additionalProperties": False}),
}
COMPLETION = {
    "prompt": {"anyOf": [_PROMPT, {"type": "array", "minItems": 1, "maxItems": 3, "items": _PROMPT}, _IDS,
                         {"type": "array", "minItems": 1, "maxItems": 2, "items": _IDS}]},
    "logprobs": _int(0, 4), "best_of": {"type": "null"}, "suffix": {"type": "null"}, "echo": {"type": "boolean"},
}
# pairs the server refuses together (top_logprobs without logprobs; echo with logprobs), as JSON Schema
DEPENDENCIES = {
    "/v1/chat/completions": {"top_logprobs": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}},
    "/v1/completions": {"echo": {"properties": {"logprobs": {"type": "null"}}}},
    "/v1/messages": {}, "/v1/messages/count_tokens": {},
}
# the share of valid cases that must answer 200 (get through the engine, not stop at a 400); less for
# /v1/messages, whose valid cases include blocks of any object, which are 400s by design
GENERATING = {"/v1/chat/completions": 0.8, "/v1/completions": 0.8, "/v1/messages": 0.5}


def _tighten(spec: dict) -> dict:
    """Valid cases that reach the engine cheaply (see the module doc), and the bodies that the batch and
    file handlers read themselves documented."""
    spec = copy.deepcopy(spec)
    paths = spec["paths"]
    for path, fields in (("/v1/chat/completions", {**SAMPLING, **CHAT}), ("/v1/completions", {**SAMPLING, **COMPLETION}),
                         ("/v1/messages", MESSAGES), ("/v1/messages/count_tokens", MESSAGES)):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert set(fields) <= set(body["properties"]), path  # no stale names here
        body["properties"].update(copy.deepcopy(fields))
        body["dependencies"] = DEPENDENCIES[path]
    paths["/v1/batches"]["post"]["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["input_file_id", "endpoint"],
        "properties": {"input_file_id": {"type": "string"},
                       "endpoint": {"type": "string", "enum": ["/v1/chat/completions", "/v1/completions"]},
                       "completion_window": {"type": "string"},
                       "metadata": {"type": "object", "additionalProperties": {"type": "string"}}}}}}}
    paths["/v1/files"]["post"]["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"enum": ["batch"]}}}}}}
    for param in paths["/v1/models/{model_id}"]["get"]["parameters"]:  # the served model, or any other name
        param["schema"] = {"anyOf": [{"enum": ["tiny"]}, {"type": "string"}]}
    return spec


def _busy_policy():
    """OPENR2_FUZZ_POLICY=1: the same run through a content policy that refuses often, on both sides, by
    patterns and by judges (the served model's verdicts read by wide expressions), so refusals mid-stream,
    held-back answers and judge calls meet every generated request."""
    from openr2.server.policy import Policy

    judge = {"judge": "Is this bad? {text}", "judge_max_tokens": 3}
    return Policy.from_dict({"rules": [
        {"id": "req-digits", "applies_to": "request", "patterns": ["a{3}", r"\d{4}"]},
        {"id": "both-e", "applies_to": "both", "patterns": ["e"], "case_sensitive": True},
        {"id": "judge-req", "applies_to": "request", "refuse_when": "^.?[a-m]", **judge},
        {"id": "judge-ans", "applies_to": "answer", "refuse_when": "^.?[n-z]", **judge}]})


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    policy = _busy_policy() if os.environ.get("OPENR2_FUZZ_POLICY") else None
    with serve_tiny(tmp_path_factory, ServerConfig(model_name="tiny", default_max_tokens=4, policy=policy)) as s:
        yield s
        if policy is not None:  # the policy did meet the requests: refusals on both sides
            text = s[1].metrics.exposition()[0].decode()
            for side in ("request", "answer"):
                counts = re.findall(rf'openr2_policy_refusals_total\{{on="{side}",rule="[^"]+"\}} (\S+)', text)
                assert sum(map(float, counts)) > 0, side


def _run(operation, mode, examples: int, base_url: str) -> tuple[list[int], list[str]]:
    """The statuses and the failures (5xx, a server_error in a stream, a dropped connection) of `examples`
    generated cases of one operation."""
    statuses: list[int] = []
    failures: list[str] = []

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode))
    def check(case):
        try:
            response = case.call(base_url=base_url, timeout=30)
        except Exception as e:  # a dropped connection, e.g. a stream that died mid-way
            failures.append(f"{case.method} {case.formatted_path} {case.body!r}: {type(e).__name__}: {e}")
            return
        statuses.append(response.status_code)
        if response.status_code >= 500 or "server_error" in response.text[-2000:]:
            failures.append(f"{case.method} {case.formatted_path} query={case.query!r} body={case.body!r}"
                            f" -> {response.status_code} {response.text[:300]}")

    check()
    return statuses, failures


def test_no_5xx_from_generated_requests(live):
    base_url, server = live
    assert server.engine.engine.model.config.vocab_size == VOCAB  # valid token ids in the schema
    schema = schemathesis.openapi.from_dict(_tighten(httpx.get(base_url + "/openapi.json").json()))
    statuses: list[int] = []
    failures: list[str] = []
    valid_generations: dict[str, list[int]] = {}
    for path, method, positive, negative in OPERATIONS:
        for mode, examples in ((GenerationMode.POSITIVE, positive), (GenerationMode.NEGATIVE, negative)):
            if not examples:
                continue
            got, failed = _run(schema[path][method], mode, max(1, round(examples * SCALE)), base_url)
            statuses += got
            failures += failed
            if path in GENERATING and mode == GenerationMode.POSITIVE:
                valid_generations[path] = got

    counts = {code: statuses.count(code) for code in sorted(set(statuses))}
    print(f"{len(statuses) + len(failures)} cases, statuses {counts}")
    assert not failures, f"{len(failures)} cases failed:\n" + "\n".join(failures[:20])
    assert len(statuses) >= 1300 * SCALE
    for path, got in valid_generations.items():  # valid requests do get through the engine, not just to a 400
        assert got.count(200) >= GENERATING[path] * len(got), (path, {code: got.count(code) for code in set(got)})
