"""Errors: every failure of a FastAPI app with our handlers is OpenAI's error JSON with the right status
(malformed JSON, JSON nested too deeply or with lone surrogates, and invalid params 400 naming the field,
unknown route 404, 405, 413, 429 with retry-after, 500 without a traceback), and the official client reads
message, param and code from it."""

from __future__ import annotations

import asyncio
import logging

import httpx2
import openai
import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient

from openr2.server.errors import (
    MAX_JSON_DEPTH,
    APIError,
    ParamError,
    decode_json,
    error_body,
    install_error_handlers,
    not_found,
    param_from_loc,
    parse_json_body,
    rate_limited,
    too_large,
    unauthorized,
)
from openr2.server.protocol import ChatCompletionRequest

SECRET = "secret-internal-detail-/srv/openr2"


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")  # FastAPI validates the body model itself
    def chat(body: ChatCompletionRequest):
        return {"model": body.model}

    @app.post("/v1/completions")  # the other style: decode and validate by hand
    async def raw(request: Request):
        req = ChatCompletionRequest.parse(parse_json_body(await request.body()))
        req.to_sampling_params(16, 100)
        return {"model": req.model}

    @app.post("/v1/files")
    def upload():
        raise too_large("File exceeds the 1 MB limit.", "file")

    @app.get("/v1/models/{model_id}")
    def model(model_id: str):
        raise not_found(f"The model '{model_id}' does not exist.", "model", "model_not_found")

    @app.get("/v1/limited")
    def limited():
        raise rate_limited(1.2)

    @app.get("/v1/private")
    def private():
        raise unauthorized()

    @app.get("/v1/files/{file_id}")
    def file(file_id: str):
        raise HTTPException(404, f"No such file: {file_id}")

    @app.get("/v1/boom")
    def boom():
        raise RuntimeError(SECRET)

    return app


@pytest.fixture(scope="module")
def client():
    return TestClient(make_app(), raise_server_exceptions=False)


def error_of(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_malformed_json_is_400(client, path):
    err = error_of(client.post(path, content=b'{"model": "m", "messages": [', headers={"content-type":
                                                                                    "application/json"}), 400)
    assert "JSON" in err["message"] and err["type"] == "invalid_request_error" and err["param"] is None
    assert client.post(path, json=CHAT).status_code == 200


def test_body_must_be_an_object(client):
    assert "JSON object" in error_of(client.post("/v1/completions", json=[CHAT]), 400)["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("patch,param", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"response_format": {"type": "xml"}}, "response_format"),  # a ParamError inside a validator
    ({"model": None}, "model"),
    ({"n": "two"}, "n"),
])
def test_invalid_param_is_400_naming_it(client, path, patch, param):
    err = error_of(client.post(path, json={**CHAT, **patch}), 400)
    assert err["param"] == param and param.split("[")[0] in err["message"]


def test_missing_param_and_sampling_range(client):
    err = error_of(client.post("/v1/chat/completions", json={"messages": CHAT["messages"]}), 400)
    assert (err["param"], err["message"]) == ("model", "Missing required parameter: 'model'.")
    err = error_of(client.post("/v1/completions", json={**CHAT, "top_p": 2.0}), 400)
    assert err["param"] == "top_p" and "(0, 1]" in err["message"]


def test_unknown_route_and_method(client):
    err = error_of(client.get("/v1/nope"), 404)
    assert err["message"] == "Invalid URL (GET /v1/nope)." and err["code"] == "not_found"
    assert error_of(client.get("/v1/files/file-9"), 404)["message"] == "No such file: file-9"
    err = error_of(client.get("/v1/models/ghost"), 404)
    assert (err["param"], err["code"]) == ("model", "model_not_found")
    assert error_of(client.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"


def test_limits_and_auth(client):
    err = error_of(client.post("/v1/files"), 413)
    assert (err["param"], err["code"]) == ("file", "request_too_large")
    resp = client.get("/v1/limited")
    assert error_of(resp, 429)["code"] == "rate_limit_exceeded"
    assert (resp.headers["retry-after"], resp.headers["retry-after-ms"]) == ("2", "1200")
    assert error_of(client.get("/v1/private"), 401)["code"] == "invalid_api_key"


def test_internal_error_is_500_without_traceback(client, caplog):
    with caplog.at_level(logging.ERROR, logger="openr2.server"):
        resp = client.get("/v1/boom")
    err = error_of(resp, 500)
    assert err["type"] == "server_error"
    for leak in (SECRET, "Traceback", "RuntimeError", "File \""):
        assert leak not in resp.text
    assert SECRET in caplog.text  # the server log keeps the details


def test_official_client_reads_our_errors():
    async def main():
        transport = httpx2.ASGITransport(app=make_app(), raise_app_exceptions=False)
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="sk-x", max_retries=0,
                                    http_client=httpx2.AsyncClient(transport=transport))
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                 response_format={"type": "xml"})
        assert (e.value.param, e.value.type) == ("response_format", "invalid_request_error")
        assert "xml" in e.value.message
        with pytest.raises(openai.NotFoundError) as e:
            await client.models.retrieve("ghost")
        assert e.value.code == "model_not_found"
        with pytest.raises(openai.InternalServerError) as e:
            await client.get("/boom", cast_to=object)
        assert SECRET not in str(e.value.body)

    asyncio.run(main())


def test_helpers():
    assert error_body("m") == {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    assert param_from_loc(("body", "messages", 0, "content")) == "messages[0].content"
    assert param_from_loc(("body", "prompt", "list[int]", 0)) == "prompt"  # union tags are not fields
    assert param_from_loc(("body",)) is None
    with pytest.raises(APIError) as e:
        parse_json_body(b"\xff\xfe")
    assert e.value.status == 400
    assert parse_json_body('{"a": 1}') == {"a": 1}


def test_json_the_server_cannot_take_is_refused_where_it_is():
    """decode_json: nesting up to MAX_JSON_DEPTH, no deeper; lone surrogates named by their path, in keys
    and values, from escapes or raw bytes; a proper surrogate pair is one character, and fine."""
    for n, ok in ((MAX_JSON_DEPTH, True), (MAX_JSON_DEPTH + 1, False), (100_000, False)):
        raw = b"[" * n + b"]" * n
        if ok:
            decode_json(raw)
        else:
            with pytest.raises(ValueError, match="nested"):
                decode_json(raw)
    for raw, param in ((b'{"a": [1, {"b": "x\\ud800"}]}', "a[1].b"), (b'{"a": {"\\udfff": 1}}', "a"),
                       (b'{"a": "\\xed\\xa0\\x80"}'.decode("unicode_escape").encode("latin-1"), "a"),
                       ('"\\udc00"', None)):
        with pytest.raises(ParamError) as e:
            decode_json(raw)
        assert e.value.param == param
    assert decode_json(b'["\\ud83d\\ude00", [1, 2.5, null, true]]') == ["\U0001F600", [1, 2.5, None, True]]
    with pytest.raises(APIError) as e:
        parse_json_body(b'{"messages": [{"content": "\\ud800"}]}')
    assert (e.value.status, e.value.param) == (400, "messages[0].content")
