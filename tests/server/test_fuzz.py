"""Schemathesis against the live server's /openapi.json: generated requests (valid and invalid) to the main
routes must never produce a 5xx, nor break a stream. Slow: a few hundred cases, under a minute or two."""

from __future__ import annotations

import copy

import httpx
import pytest

from openr2.server.app import ServerConfig
from tests.checkpoints import save_tiny_chat_checkpoint
from tests.server._live import serve

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

pytestmark = pytest.mark.slow

# (path, method, examples per generation mode): positive = valid by the schema, negative = not
OPERATIONS = [
    ("/v1/chat/completions", "POST", 150),
    ("/v1/completions", "POST", 120),
    ("/v1/models", "GET", 5),
    ("/v1/files", "POST", 12),
    ("/v1/files", "GET", 8),
    ("/v1/files/{file_id}", "GET", 5),
    ("/v1/files/{file_id}", "DELETE", 5),
    ("/v1/files/{file_id}/content", "GET", 5),
    ("/v1/batches", "POST", 12),
    ("/v1/batches", "GET", 8),
    ("/v1/batches/{batch_id}", "GET", 5),
    ("/v1/batches/{batch_id}/cancel", "POST", 5),
    ("/v1/usage", "GET", 12),
]
SMALL = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 4}, {"type": "null"}]}


def _tighten(spec: dict) -> dict:
    """Keep generation cheap for the tiny model (few tokens, few samples, our model name in valid cases) and
    document the bodies that the batch and file handlers read themselves."""
    spec = copy.deepcopy(spec)
    paths = spec["paths"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        props = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
        props["model"] = {"type": "string", "enum": ["tiny"]}
        for name in ("max_tokens", "max_completion_tokens", "n", "best_of", "logprobs", "top_logprobs"):
            if name in props:
                props[name] = copy.deepcopy(SMALL)
    # valid cases should reach the engine: every message with text content (others are negative cases)
    chat = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    chat["properties"]["messages"] = {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]},
                       "content": {"type": "string", "maxLength": 200}}}}
    paths["/v1/batches"]["post"]["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["input_file_id", "endpoint"],
        "properties": {"input_file_id": {"type": "string"},
                       "endpoint": {"type": "string", "enum": ["/v1/chat/completions", "/v1/completions"]},
                       "completion_window": {"type": "string"},
                       "metadata": {"type": "object", "additionalProperties": {"type": "string"}}}}}}}
    paths["/v1/files"]["post"]["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string"}}}}}}
    return spec


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tiny_chat_checkpoint(ckpt)
    with serve(ckpt, tmp_path_factory.mktemp("data"), ServerConfig(model_name="tiny", default_max_tokens=4)) as s:
        yield s


def test_no_5xx_from_generated_requests(live):
    base_url, _ = live
    spec = _tighten(httpx.get(base_url + "/openapi.json").json())
    schema = schemathesis.openapi.from_dict(spec)
    failures: list[str] = []
    calls = 0
    statuses: dict[int, int] = {}

    for path, method, examples in OPERATIONS:
        operation = schema[path][method]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode))
            def check(case):
                nonlocal calls
                calls += 1
                try:
                    response = case.call(base_url=base_url, timeout=30)
                except Exception as e:  # a dropped connection, e.g. a stream that died mid-way
                    failures.append(f"{case.method} {case.formatted_path} {case.body!r}: {type(e).__name__}: {e}")
                    return
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code >= 500 or "server_error" in response.text[-2000:]:
                    failures.append(f"{case.method} {case.formatted_path} query={case.query!r} body={case.body!r}"
                                    f" -> {response.status_code} {response.text[:300]}")

            try:
                check()
            except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (e.g. GET /v1/models)
                assert mode == GenerationMode.NEGATIVE, (path, method)

    print(f"{calls} cases, statuses {dict(sorted(statuses.items()))}")
    assert calls >= 200, calls
    assert statuses.get(200, 0) >= 50  # valid requests do get through to the engine
    assert not failures, f"{len(failures)} of {calls} cases failed:\n" + "\n".join(failures[:20])
