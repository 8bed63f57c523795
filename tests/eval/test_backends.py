"""HTTP backend against a scripted endpoint: retries with backoff and Retry-After, hard errors, response
parsing (openr2/eval/backends.py). The scripted server is stdlib http.server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from openr2.eval.backends import EndpointError, HTTPBackend, Request, _retry_after_s
from tests.server._live import free_port

REPLY = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
         "choices": [{"index": 0, "finish_reason": "stop",
                      "message": {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "2+2=4"}}],
         "usage": {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16, "prompt_cache_hit_tokens": 4,
                   "completion_tokens_details": {"reasoning_tokens": 3}}}


@contextlib.contextmanager
def scripted(responses):
    """Serve POSTs from a list of (status, headers, body); the last one repeats. Yields (base_url, log)."""
    log = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            log.append((time.monotonic(), self.path, self.headers.get("Authorization"), body))
            status, headers, reply = responses[min(len(log) - 1, len(responses) - 1)]
            data = json.dumps(reply).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", log
    finally:
        server.shutdown()
        server.server_close()


def _request(i=0):
    return Request(f"item-{i}", 0, [{"role": "user", "content": "2+2?"}], 0.0, 1.0, 32, 123)


def test_parses_reasoning_content_and_usage():
    with scripted([(200, {}, REPLY)]) as (url, log):
        backend = HTTPBackend(url, "m", api_key="sk-test")
        c = backend.complete(_request())
    assert (c.content, c.reasoning, c.finish_reason) == ("The answer is 4.", "2+2=4", "stop")
    assert (c.usage.prompt_tokens, c.usage.cached_prompt_tokens, c.usage.completion_tokens, c.usage.reasoning_tokens) \
        == (10, 4, 6, 3)
    _, path, auth, body = log[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body == {"model": "m", "messages": [{"role": "user", "content": "2+2?"}], "temperature": 0.0, "top_p": 1.0,
                    "max_tokens": 32, "seed": 123, "stream": False}


def test_think_tags_left_in_content_are_not_graded():
    reply = json.loads(json.dumps(REPLY))
    reply["choices"][0]["message"] = {"role": "assistant", "content": "<think>\nmaybe 5\n</think>\n\n4"}
    with scripted([(200, {}, reply)]) as (url, _):
        c = HTTPBackend(url, "m").complete(_request())
    assert (c.reasoning, c.content) == ("maybe 5", "4")


def test_retries_429_and_5xx_honouring_retry_after():
    error = {"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}
    script = [(429, {"retry-after-ms": "300"}, error), (503, {"Retry-After": "0"}, error), (500, {}, error),
              (200, {}, REPLY)]
    with scripted(script) as (url, log):
        backend = HTTPBackend(url, "m", backoff_s=0.01)
        c = backend.complete(_request())
    assert c.content == "The answer is 4." and len(log) == 4 and backend.retries == 3
    assert log[1][0] - log[0][0] >= 0.29  # waited what retry-after-ms asked, not the 10 ms backoff


def test_gives_up_after_max_retries():
    with scripted([(503, {}, {"error": {"message": "overloaded"}})]) as (url, log):
        with pytest.raises(EndpointError, match=r"HTTP 503: overloaded \(after 3 attempts\)"):
            HTTPBackend(url, "m", max_retries=2, backoff_s=0.01).complete(_request())
    assert len(log) == 3


@pytest.mark.parametrize("status, hint", [(401, "check --api-key"), (404, "check --model-name"), (400, "")])
def test_client_errors_are_not_retried(status, hint):
    with scripted([(status, {}, {"error": {"message": "no good"}})]) as (url, log):
        with pytest.raises(EndpointError, match=f"HTTP {status}: no good") as e:
            HTTPBackend(url, "m", backoff_s=0.01).complete(_request())
    assert hint in str(e.value) and len(log) == 1


def test_unreachable():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EndpointError, match="cannot reach the endpoint"):
        HTTPBackend(url, "m", max_retries=1, backoff_s=0.01).complete(_request())


def test_run_keeps_concurrency_and_stops_at_a_hard_error():
    with scripted([(200, {}, REPLY)]) as (url, log):
        out = list(HTTPBackend(url, "m", concurrency=3).run([_request(i) for i in range(7)]))
    assert sorted(r.item_id for r, _ in out) == [f"item-{i}" for i in range(7)]
    with scripted([(200, {}, REPLY), (401, {}, {"error": {"message": "bad key"}})]) as (url, log):
        seen = []
        with pytest.raises(EndpointError, match="401"):
            for r, _ in HTTPBackend(url, "m", concurrency=1).run([_request(i) for i in range(5)]):
                seen.append(r.item_id)
    assert seen == ["item-0"] and len(log) == 2  # nothing queued is sent after the failure


def test_retry_after_parsing():
    assert _retry_after_s({"retry-after-ms": "1500"}) == 1.5
    assert _retry_after_s({"retry-after": "2"}) == 2.0
    assert _retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    assert _retry_after_s({"retry-after": "soon"}) is None
    assert _retry_after_s({}) is None


def test_bad_base_url():
    with pytest.raises(ValueError, match="http://"):
        HTTPBackend("127.0.0.1:8000/v1", "m")
