"""Security and privacy of the server: keys and their scopes, rate limits, body limits, no outbound
network, and no prompt or completion text at rest unless log_content."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import time

import httpx
import openai
import pytest

from openr2.server.app import ServerConfig
from tests.server._live import db_bytes, serve
from tests.server.test_app import _batch_file, _client, _wait_for_batch

ERROR_FIELDS = {"message", "type", "param", "code"}


def _config(**kwargs) -> ServerConfig:
    return ServerConfig(model_name="tiny", default_max_tokens=8, **kwargs)


def _chat(client, content="hi", **kwargs):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                          max_tokens=2, temperature=0, **kwargs)


def _is_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS
    return body["error"]


# ---------------------------------------------------------------------------------------------- auth

def test_require_auth_and_key_scopes(ckpt, tmp_path):
    with serve(ckpt, tmp_path, _config(require_auth=True)) as (base_url, server):
        err = _is_openai_error(httpx.get(base_url + "/v1/models"), 401)
        assert err["code"] == "missing_api_key"
        err = _is_openai_error(httpx.get(base_url + "/v1/models", headers={"authorization": "Bearer sk-wrong"}), 401)
        assert err["code"] == "invalid_api_key"
        _is_openai_error(httpx.post(base_url + "/v1/chat/completions", json={}), 401)
        with pytest.raises(openai.AuthenticationError):
            _chat(_client(base_url, "sk-wrong"))

        key_a, secret_a = server.ledger.create_key("alice")
        key_b, secret_b = server.ledger.create_key("bob")
        a, b = _client(base_url, secret_a), _client(base_url, secret_b)
        _chat(a)
        upload = a.files.create(file=("batch.jsonl", _batch_file(2, max_tokens=2)), purpose="batch")
        batch = _wait_for_batch(a, a.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                                    completion_window="24h").id)
        assert batch.status == "completed"

        # B sees none of A's things: 404, never 403 (which would confirm they exist)
        for call in (lambda: b.files.retrieve(upload.id), lambda: b.files.content(upload.id),
                     lambda: b.files.delete(upload.id), lambda: b.batches.retrieve(batch.id),
                     lambda: b.batches.cancel(batch.id), lambda: b.files.content(batch.output_file_id)):
            with pytest.raises(openai.NotFoundError):
                call()
        assert upload.id not in [f.id for f in b.files.list().data]
        assert batch.id not in [x.id for x in b.batches.list().data]
        with pytest.raises(openai.BadRequestError):  # nor use A's file as its own batch input
            b.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")

        def usage(secret, **params):
            r = httpx.get(base_url + "/v1/usage", params=params, headers={"authorization": f"Bearer {secret}"})
            assert r.status_code == 200
            return r.json()["data"]

        assert usage(secret_b) == [] and usage(secret_b, group_by="key") == []
        assert usage(secret_a)[0]["requests"] == 3  # one chat + two batch lines
        _chat(b)
        assert usage(secret_b)[0]["requests"] == 1
        assert {row.get("key_id") for row in usage(secret_b, group_by="key")} <= {key_b}
        assert key_a not in json.dumps(usage(secret_b, group_by="key"))
        assert a.files.retrieve(upload.id).id == upload.id  # A still sees its own

        stored = db_bytes(tmp_path)
        for secret in (secret_a, secret_b):
            assert secret.encode() not in stored
            assert secret.split("-", 1)[-1].encode() not in stored  # nor its random part


def test_rate_limit_is_429_with_retry_after(ckpt, tmp_path):
    with serve(ckpt, tmp_path, _config(requests_per_min=2)) as (base_url, _):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        for _ in range(2):
            assert httpx.post(base_url + "/v1/chat/completions", json=body).status_code == 200
        r = httpx.post(base_url + "/v1/chat/completions", json=body)
        err = _is_openai_error(r, 429)
        assert err["code"] == "rate_limit_exceeded"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        with pytest.raises(openai.RateLimitError):
            _chat(_client(base_url))


def test_body_too_large_is_413(ckpt, tmp_path):
    with serve(ckpt, tmp_path, _config(max_body_bytes=512)) as (base_url, _):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 2000}], "max_tokens": 1}
        for route in ("/v1/chat/completions", "/v1/completions", "/v1/batches"):
            err = _is_openai_error(httpx.post(base_url + route, json=body), 413)
            assert err["code"] == "request_too_large"
        assert httpx.post(base_url + "/v1/chat/completions", json={**body, "messages": [
            {"role": "user", "content": "small"}]}).status_code == 200


# ---------------------------------------------------------------------------------------------- privacy

def _is_loopback(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture
def no_network(monkeypatch):
    """Any connection, datagram or name lookup outside 127.0.0.0/8 and ::1 raises and is recorded."""
    attempts: list[str] = []

    def guard(what, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(address, (str, bytes)) and not isinstance(address, tuple):  # AF_UNIX path: local
            return
        if not _is_loopback(host):
            attempts.append(f"{what} {address!r}")
            raise OSError(f"test: outbound network access blocked ({what} {address!r})")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_sendto, real_create, real_gai = socket.socket.sendto, socket.create_connection, socket.getaddrinfo

    def connect(self, address):
        guard("connect", address)
        return real_connect(self, address)

    def connect_ex(self, address):
        guard("connect_ex", address)
        return real_connect_ex(self, address)

    def sendto(self, data, *args):
        guard("sendto", args[-1])
        return real_sendto(self, data, *args)

    def create_connection(address, *args, **kwargs):
        guard("create_connection", address)
        return real_create(address, *args, **kwargs)

    def getaddrinfo(host, *args, **kwargs):
        guard("getaddrinfo", (host,))
        return real_gai(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket.socket, "sendto", sendto)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


def test_no_outbound_connections_from_any_endpoint(ckpt, tmp_path, no_network):
    # the guard works: a non-loopback connection fails loudly and is recorded
    with pytest.raises(OSError), socket.socket() as s:
        s.connect(("10.255.255.1", 9))
    with pytest.raises(OSError):
        socket.getaddrinfo("example.com", 443)
    assert len(no_network) == 2
    no_network.clear()

    with serve(ckpt, tmp_path) as (base_url, _):
        client = _client(base_url)
        assert [m.id for m in client.models.list().data][0] == "tiny"
        _chat(client)
        list(_chat(client, stream=True, stream_options={"include_usage": True}))
        client.completions.create(model="tiny", prompt="The answer is", max_tokens=2)
        # mid-stream completion chunks carry finish_reason null, as OpenAI's do, which the client's strict
        # Completion type rejects: read this stream leniently (test_protocol checks the chunks' shapes)
        lenient = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
        list(lenient.completions.create(model="tiny", prompt="The answer is", max_tokens=2, stream=True))
        upload = client.files.create(file=("batch.jsonl", _batch_file(2, max_tokens=2)), purpose="batch")
        assert client.files.retrieve(upload.id).id == upload.id
        assert client.files.content(upload.id).content
        assert upload.id in [f.id for f in client.files.list().data]
        batch = _wait_for_batch(client, client.batches.create(input_file_id=upload.id,
                                                              endpoint="/v1/chat/completions",
                                                              completion_window="24h").id)
        assert batch.status == "completed" and client.batches.list().data
        client.files.delete(batch.output_file_id)
        other = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        try:
            assert client.batches.cancel(other.id).status in ("cancelling", "cancelled")
        except openai.ConflictError:  # it had already finished
            pass
        for path in ("/v1/usage", "/metrics", "/health", "/", "/openapi.json", "/docs"):
            assert httpx.get(base_url + path).status_code < 500, path
    assert no_network == []


_URL_ATTR = re.compile(r"""(?:src|href|action)\s*=\s*["']?([^"'\s>]+)""", re.I)
_ABSOLUTE_URL = re.compile(r"""(?:https?:)?//([^/"'\s)]+)""", re.I)


def test_no_served_page_loads_anything_from_another_host(ckpt, tmp_path):
    """Every HTML page the server serves (the routes of /openapi.json, the pages outside it, and every
    same-origin link of those), with the default config: no src/href/url(...) to another host. FastAPI's
    /docs and /redoc load Swagger UI and ReDoc from a CDN, so they are off unless ServerConfig.docs."""
    with serve(ckpt, tmp_path, _config()) as (base_url, _):
        for path in ("/docs", "/redoc"):
            assert _is_openai_error(httpx.get(base_url + path), 404)["code"] == "not_found"
        spec = httpx.get(base_url + "/openapi.json").json()
        todo = ["/", "/docs", "/redoc", "/docs/oauth2-redirect", "/metrics", "/openapi.json",
                *(p for p, ops in spec["paths"].items() if "get" in ops and "{" not in p)]
        seen, pages = set(), 0
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.add(path)
            r = httpx.get(base_url + path)
            assert r.status_code < 500, path
            if "html" not in r.headers.get("content-type", ""):
                continue
            pages += 1
            found = _URL_ATTR.findall(r.text) + re.findall(r"url\(\s*['\"]?([^'\")]+)", r.text)
            outside = [u for u in found if (m := _ABSOLUTE_URL.match(u)) and not _is_loopback(m.group(1).split(":")[0])]
            assert not outside, (path, outside)
            todo += [u.split("#")[0].split("?")[0] for u in found if u.startswith("/") and not u.startswith("//")]
        assert pages >= 1  # the chat page at least
        assert httpx.post(base_url + "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).status_code == 200
    with serve(ckpt, tmp_path, _config(docs=True)) as (base_url, _):  # the operator's explicit choice
        assert httpx.get(base_url + "/docs").status_code == 200


def _distinctive(tag: str) -> tuple[str, str]:
    return f"zebra{tag}quokka marmalade", f"zebra{tag}quokka"


@pytest.mark.parametrize("log_content", [False, True])
def test_prompts_are_stored_only_with_log_content(ckpt, tmp_path, log_content):
    prompt, needle = _distinctive("chat")
    completion_prompt, completion_needle = _distinctive("cmpl")
    with serve(ckpt, tmp_path, _config(log_content=log_content), log_content=log_content) as (base_url, server):
        client = _client(base_url)
        answer = _chat(client, prompt).choices[0].message
        list(_chat(client, prompt + " again", stream=True))
        client.completions.create(model="tiny", prompt=completion_prompt, max_tokens=2)
        deadline = time.time() + 5
        while (server.ledger.usage_report() or [{"requests": 0}])[0]["requests"] < 3 and time.time() < deadline:
            time.sleep(0.02)  # the stream is billed as it closes
        stored = db_bytes(tmp_path)
    assert (needle.encode() in stored) == log_content
    if not log_content:
        assert completion_needle.encode() not in stored
        generated = (answer.reasoning_content or "") + (answer.content or "")
        if len(generated) >= 8:
            assert generated.encode() not in stored


def test_batch_prompts_do_not_stay_in_the_database(ckpt, tmp_path):
    """Batch lines are kept in the DB only while the batch runs; the finished batch leaves no prompt text
    in the database file (the input and output files are the user's own record, under data_dir/files)."""
    prompt, needle = _distinctive("batch")
    line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": prompt}]}}
    with serve(ckpt, tmp_path, _config()) as (base_url, _):
        client = _client(base_url)
        upload = client.files.create(file=("b.jsonl", (json.dumps(line) + "\n").encode()), purpose="batch")
        batch = _wait_for_batch(client, client.batches.create(input_file_id=upload.id,
                                                              endpoint="/v1/chat/completions",
                                                              completion_window="24h").id)
        assert batch.status == "completed"
        stored = db_bytes(tmp_path)
    assert needle.encode() not in stored


def test_bad_paging_and_batch_fields_are_400_not_500(ckpt, tmp_path):
    """Found by tests/server/test_fuzz.py: these reached the ledger's ValueError/TypeError and answered 500."""
    with serve(ckpt, tmp_path, _config()) as (base_url, _):
        for path in ("/v1/files", "/v1/batches"):
            for limit in (0, -5, 10**30):
                err = _is_openai_error(httpx.get(base_url + path, params={"limit": limit}), 400)
                assert err["param"] == "limit"
        for window in ([], {}, 5):
            r = httpx.post(base_url + "/v1/batches", json={"input_file_id": "file-x", "endpoint": "/v1/completions",
                                                           "completion_window": window})
            assert _is_openai_error(r, 400)["param"] == "completion_window"


def test_unbounded_inputs_are_400_not_a_hang_or_500(ckpt, tmp_path):
    """Found by fuzzing: n=691553 held the engine (every later request timed out); a usage bound beyond
    64 bits was a 500 from SQLite."""
    with serve(ckpt, tmp_path, _config()) as (base_url, _):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "n": 691553}
        assert _is_openai_error(httpx.post(base_url + "/v1/chat/completions", json=body, timeout=10), 400)["param"] == "n"
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 1, "n": 129}
        assert _is_openai_error(httpx.post(base_url + "/v1/completions", json=body, timeout=10), 400)["param"] == "n"
        r = httpx.post(base_url + "/v1/completions", json={**body, "n": 128}, timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"]) == 128
        for name in ("start", "end"):
            r = httpx.get(base_url + "/v1/usage", params={name: -6956769941861398027960320})
            assert _is_openai_error(r, 400)["param"] == name
