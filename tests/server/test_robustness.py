"""No request can break the server: what once killed the engine, crashed a handler or wedged a batch is
now a 4xx (or that one request's own error), and the server goes on serving everyone else.

Each case goes through the HTTP API of a live server and ends by checking that a normal request still
works. `poison` stands in for any failure inside the engine that validation did not foresee: it changes a
request's sampling params behind the validation's back, into what once overflowed the sampler.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import httpx
import openai
import pytest

from openr2.server.ratelimit import RateLimiter
from tests.checkpoints import save_tiny_chat_checkpoint
from tests.server._live import free_port, serve
from tests.server.test_app import _client, _totals, _wait_for_batch

ENGINE_KILLER = {"temperature": 1, "top_k": 9223372036854775808}  # once overflowed the sampler's int64
POISON_SEED = 4242  # requests with this seed fail inside the engine (see `poison`)
USER = {"role": "user", "content": "What is 2+2?"}


@pytest.fixture
def poison(live, monkeypatch):
    """Requests with seed POISON_SEED fail in the engine's sampler after their first output."""
    _, server = live
    generate = server.engine.generate

    async def poisoned(prompt, params=None, *args, **kwargs):
        async for out in generate(prompt, params, *args, **kwargs):
            if params.seed == POISON_SEED:
                params.top_k = 2**63
            yield out

    monkeypatch.setattr(server.engine, "generate", poisoned)


def _still_serving(base_url):
    resp = _client(base_url).chat.completions.create(model="tiny", messages=[USER], max_tokens=2)
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(base_url + "/health").json()["status"] == "ok"


def _post(base_url, path, raw: bytes) -> httpx.Response:
    return httpx.post(base_url + path, content=raw, headers={"content-type": "application/json"}, timeout=30)


def _error(resp: httpx.Response, status: int = 400) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    return error


def _batch(client, lines: list[dict]):
    data = "\n".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "tiny", "max_tokens": 4, "messages": [USER], **body}})
                     for i, body in enumerate(lines)).encode()
    upload = client.files.create(file=("batch.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")


def _lines(client, file_id) -> dict[str, dict]:
    return {x["custom_id"]: x for x in map(json.loads, client.files.content(file_id).text.splitlines())}


# ---------------------------------------------------------------------------------------------- sampling

def test_the_engine_killer_is_a_400_naming_top_k(live):
    base_url, _ = live
    client = _client(base_url)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[USER], max_tokens=4, extra_body=ENGINE_KILLER)
    assert err.value.body["param"] == "top_k" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="2+2=", max_tokens=4, extra_body=ENGINE_KILLER)
    assert err.value.body["param"] == "top_k"
    _still_serving(base_url)


@pytest.mark.parametrize("field, value", [
    ("seed", 2**64), ("seed", -(2**63) - 1), ("n", 129), ("top_logprobs", 21), ("max_tokens", 0),
    ("temperature", -0.5), ("top_p", 0), ("min_p", 1.5), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("repetition_penalty", 0), ("stop_token_ids", [-1]), ("stop", [""]),
])
def test_out_of_range_sampling_params_are_400s_naming_them(live, field, value):
    base_url, _ = live
    body = {"model": "tiny", "messages": [USER], "max_tokens": 2, "logprobs": field == "top_logprobs", field: value}
    assert _error(_post(base_url, "/v1/chat/completions", json.dumps(body).encode()))["param"] == field
    _still_serving(base_url)


def test_a_stream_in_flight_survives_the_engine_killer(live, poison):
    base_url, server = live
    client = _client(base_url)
    stream = client.chat.completions.create(model="tiny", messages=[USER], max_tokens=450, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = [next(stream)]
    with pytest.raises(openai.BadRequestError):  # the killer itself: refused before the engine
        client.chat.completions.create(model="tiny", messages=[USER], max_tokens=4, extra_body=ENGINE_KILLER)
    with pytest.raises(openai.InternalServerError) as err:  # one that fails inside the engine, next to the stream
        client.chat.completions.create(model="tiny", messages=[USER], max_tokens=50, seed=POISON_SEED,
                                       temperature=1, extra_body={"ignore_eos": True})
    assert "Traceback" not in err.value.message
    assert server.engine.engine.has_unfinished_requests()  # the stream was still running meanwhile
    chunks += list(stream)
    assert chunks[-1].usage.completion_tokens == 450
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    _still_serving(base_url)


def test_a_stream_that_fails_after_its_headers_ends_with_an_error_event(live, poison):
    base_url, _ = live
    body = {"model": "tiny", "messages": [USER], "max_tokens": 50, "seed": POISON_SEED, "temperature": 1,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "Traceback" not in error["message"]
    assert all("error" not in json.loads(e) for e in events[:-2])
    with pytest.raises(openai.APIError):  # the official client raises on the error event
        list(_client(base_url).chat.completions.create(stream=True, **{k: v for k, v in body.items()
                                                                      if k not in ("stream", "ignore_eos")}))
    _still_serving(base_url)


# ---------------------------------------------------------------------------------------------- bodies

def _deep(n: int) -> bytes:
    return b'{"model": "tiny", "messages": ' + b"[" * n + b"]" * n + b"}"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/batches"])
def test_deeply_nested_json_is_a_400(live, path):
    base_url, _ = live
    assert "nested" in _error(_post(base_url, path, _deep(10_000)))["message"]
    assert "nested" in _error(_post(base_url, path, _deep(100)))["message"]  # within the recursion limit too
    _still_serving(base_url)


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", b'{"model": "a\\udfffb", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}',
     "stop"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ["ok", "\\udc00"]}', "prompt[1]"),
    ("/v1/batches", b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "metadata": {"k": "\\ud800"}}',
     "metadata.k"),
])
def test_lone_surrogates_are_400s_naming_the_field(live, path, raw, param):
    base_url, _ = live
    error = _error(_post(base_url, path, raw))
    assert error["param"] == param and "surrogate" in error["message"]
    _still_serving(base_url)


def test_a_valid_surrogate_pair_is_fine(live):
    base_url, _ = live
    raw = b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}]}'
    assert _post(base_url, "/v1/chat/completions", raw).status_code == 200


@pytest.mark.parametrize("tool_calls, param", [
    ([1], "messages[1].tool_calls[0]"),
    ([{"function": 5}], "messages[1].tool_calls[0].function"),
    ([{"function": {"name": "f", "arguments": {"a": 1}}}], "messages[1].tool_calls[0].function.arguments"),
    ([{"function": {"name": 5, "arguments": "{}"}}], "messages[1].tool_calls[0].function.name"),
    ([{"function": {"arguments": "{}"}}], "messages[1].tool_calls[0].function.name"),
    ([{}], "messages[1].tool_calls[0].function"),
    ([{"type": "web", "function": {"name": "f", "arguments": "{}"}}], "messages[1].tool_calls[0].type"),
    ("calls", "messages[1].tool_calls"),
])
def test_malformed_tool_calls_are_400s(live, tool_calls, param):
    base_url, _ = live
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": tool_calls},
                {"role": "tool", "tool_call_id": "c1", "content": "4"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 2}
    assert _error(_post(base_url, "/v1/chat/completions", json.dumps(body).encode()))["param"] == param
    messages[1]["tool_calls"] = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]
    assert _post(base_url, "/v1/chat/completions", json.dumps(body).encode()).status_code == 200
    _still_serving(base_url)


# ---------------------------------------------------------------------------------------------- disconnect

def test_a_non_streamed_request_whose_client_left_is_aborted_and_billed_for_what_it_generated(live):
    base_url, server = live
    engine = server.engine.engine
    before = _totals(base_url)
    body = json.dumps({"model": "tiny", "messages": [USER], "max_tokens": 480, "temperature": 0,
                       "ignore_eos": True}).encode()
    url = urllib.parse.urlsplit(base_url)
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 30
        while time.time() < deadline and not any(len(r.outputs[0].token_ids) >= 5
                                                 for r in list(engine.requests.values())):
            time.sleep(0.005)
    # the client hung up after a few tokens: the request stops and is billed for what it generated
    deadline = time.time() + 30
    while (engine.has_unfinished_requests() or _totals(base_url)["requests"] == before["requests"]) \
            and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.has_unfinished_requests() and engine.blocks.num_free == engine.pool.num_blocks
    after = _totals(base_url)
    assert after["requests"] == before["requests"] + 1
    assert 5 <= after["completion_tokens"] - before.get("completion_tokens", 0) < 480
    _still_serving(base_url)


# ---------------------------------------------------------------------------------------------- batches

def test_batch_lines_that_fail_are_their_own_errors_and_the_batch_completes(live, poison):
    base_url, _ = live
    client = _client(base_url)
    batch = _batch(client, [
        {"temperature": 0},
        {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [{"function": 5}]}, USER]},
        ENGINE_KILLER,
        {"seed": POISON_SEED, "temperature": 1, "max_tokens": 20, "ignore_eos": True},  # fails in the engine
        {"temperature": 0},
    ])
    batch = _wait_for_batch(client, batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 3)
    assert set(_lines(client, batch.output_file_id)) == {"line-0", "line-4"}
    errors = _lines(client, batch.error_file_id)
    status = {cid: x["response"]["status_code"] for cid, x in errors.items()}
    assert status == {"line-1": 400, "line-2": 400, "line-3": 500}
    assert errors["line-2"]["response"]["body"]["error"]["param"] == "top_k"
    assert errors["line-3"]["response"]["body"]["error"]["type"] == "server_error"
    _still_serving(base_url)


def test_cancelling_a_batch_with_a_failing_line_reaches_cancelled(live, poison):
    base_url, _ = live
    client = _client(base_url)
    lines = [{"seed": POISON_SEED, "temperature": 1, "max_tokens": 20, "ignore_eos": True}]
    batch = _batch(client, lines + [{"max_tokens": 100, "ignore_eos": True}] * 30)
    deadline = time.time() + 60
    while client.batches.retrieve(batch.id).request_counts.failed < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = _wait_for_batch(client, batch.id)
    assert batch.status == "cancelled" and batch.request_counts.completed < 30
    _still_serving(base_url)


def test_a_batch_whose_input_cannot_be_taken_fails_once_with_its_reasons(live, caplog):
    base_url, _ = live
    client = _client(base_url)
    good = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "tiny", "messages": [USER], "max_tokens": 2}})
    deep = '{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": ' + "[" * 5000 + "]" * 5000
    surrogate = good.replace('"a"', '"c"').replace("What is", "What \\ud800 is")
    upload = client.files.create(file=("bad.jsonl", "\n".join([good, deep + "}", surrogate]).encode()),
                                 purpose="batch")
    with caplog.at_level(logging.ERROR, logger="openr2.server"):
        batch = _wait_for_batch(client, client.batches.create(input_file_id=upload.id,
                                                              endpoint="/v1/chat/completions",
                                                              completion_window="24h").id)
        time.sleep(1.5)  # a few worker polls: nothing is retried or logged
    assert batch.status == "failed"
    assert [(e.line, e.code) for e in batch.errors.data] == [(2, "invalid_request"), (3, "invalid_request")]
    assert "nested" in batch.errors.data[0].message
    assert batch.errors.data[1].param == "body.messages[0].content"
    assert not caplog.records
    _still_serving(base_url)


def test_a_batch_that_breaks_validation_fails_once(live, monkeypatch, caplog):
    """Whatever validation did not foresee fails the batch once, not at every poll of the worker."""
    base_url, _ = live
    client = _client(base_url)

    def broken(*args):
        raise RuntimeError("unforeseen")

    monkeypatch.setattr("openr2.server.batch_store._parse_batch_input", broken)
    with caplog.at_level(logging.ERROR, logger="openr2.server"):
        batch = _wait_for_batch(client, _batch(client, [{}]).id)
        time.sleep(1.5)
    assert batch.status == "failed" and batch.errors.data[0].code == "invalid_file"
    assert len(caplog.records) == 1
    monkeypatch.undo()
    assert _wait_for_batch(client, _batch(client, [{}]).id).status == "completed"


def test_batch_lines_wait_for_the_keys_rate_limits(live, monkeypatch):
    base_url, server = live
    client = _client(base_url)
    monkeypatch.setattr(server, "limiter", RateLimiter(requests_per_min=2, tokens_per_min=300, window_s=1.0))
    start = time.time()
    batch = _wait_for_batch(client, _batch(client, [{}] * 6 + [{"max_tokens": 400}]).id)
    assert time.time() - start >= 2.0  # 6 lines at 2 per second: two waits for the window, no 429s
    assert batch.status == "completed" and batch.request_counts.completed == 6
    error = _lines(client, batch.error_file_id)["line-6"]["response"]  # more than a minute's tokens alone
    assert error["status_code"] == 400 and error["body"]["error"]["param"] == "max_tokens"
    monkeypatch.undo()
    _still_serving(base_url)


# ---------------------------------------------------------------------------------------------- a dead engine

def test_a_dead_engine_says_so_and_answers_503(tmp_path, monkeypatch):
    """A failure no request explains stops the engine: the stream in flight ends with an error event, /health
    is 503 with the reason, and every later request is a 503 at once (openr2 serve then exits)."""
    save_tiny_chat_checkpoint(tmp_path / "ckpt")
    (tmp_path / "data").mkdir()
    with serve(tmp_path / "ckpt", tmp_path / "data") as (base_url, server):
        body = {"model": "tiny", "messages": [USER], "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")

            def broken(plan, **options):
                raise RuntimeError("device lost")

            monkeypatch.setattr(server.engine.engine.runner, "run", broken)
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_unavailable"
        health = httpx.get(base_url + "/health")
        assert health.status_code == 503 and "RuntimeError" in health.json()["reason"]
        for path, request in (("/v1/chat/completions", {"messages": [USER]}), ("/v1/completions", {"prompt": "hi"})):
            resp = httpx.post(base_url + path, json={"model": "tiny", "max_tokens": 2, **request}, timeout=10)
            assert _error(resp, 503)["code"] == "engine_unavailable"


@pytest.mark.slow
def test_serve_exits_non_zero_when_its_engine_dies(tmp_path):
    save_tiny_chat_checkpoint(tmp_path / "ckpt")
    port = free_port()
    script = ("import sys; from openr2 import cli; from openr2.engine.runner import ModelRunner\n"
              "def broken(self, plan, **options): raise RuntimeError('device lost')\n"
              "ModelRunner.run = broken\n"
              f"sys.exit(cli.main(['serve', '--model', {str(tmp_path / 'ckpt')!r}, '--port', '{port}',"
              f" '--data-dir', {str(tmp_path / 'data')!r}, '--served-model-name', 'tiny', '--no-compile']))")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                resp = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                                  json={"model": "tiny", "messages": [USER], "max_tokens": 2})
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                time.sleep(0.2)
        assert _error(resp, 503)["code"] == "engine_unavailable"
        assert proc.wait(timeout=30) == 1  # for the supervisor to restart it
        assert b"engine step failed" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
