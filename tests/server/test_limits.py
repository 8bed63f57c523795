"""Body size limits (server/limits.py), over raw sockets: an oversized body is refused while it arrives,
never after it has been read into memory, and the server keeps serving."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import httpx
import pytest

from openr2.server.app import ServerConfig
from tests.server._live import serve_tiny

BODY_LIMIT, FILE_LIMIT = 64 << 10, 256 << 10
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    config = ServerConfig(model_name="tiny", default_max_tokens=4, max_body_bytes=BODY_LIMIT,
                          max_file_bytes=FILE_LIMIT)
    with serve_tiny(tmp_path_factory, config) as running:
        yield running


def _connect(base_url: str) -> socket.socket:
    url = urlsplit(base_url)
    return socket.create_connection((url.hostname, url.port), timeout=10)


def _read_response(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of one response (the server sends Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(body)


def _head(path: str, content_type: str, length: int | None = None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n").encode()


def _assert_413(status: int, body: dict, limit: int) -> None:
    assert status == 413, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "request_too_large" and str(limit) in body["error"]["message"]


def _still_serves(base_url: str) -> None:
    assert httpx.post(base_url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


@pytest.mark.parametrize("path,limit", [("/v1/chat/completions", BODY_LIMIT), ("/v1/completions", BODY_LIMIT),
                                        ("/v1/batches", BODY_LIMIT), ("/v1/files", FILE_LIMIT)])
def test_content_length_over_the_limit_is_refused_before_the_body(live, path, limit):
    """Only the headers are sent: the 413 must come without the server waiting for a single body byte."""
    base_url, _ = live
    with _connect(base_url) as sock:
        sock.sendall(_head(path, "application/json", 10**12))
        _assert_413(*_read_response(sock), limit)
    _still_serves(base_url)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_chunked_json_body_is_cut_off_once_past_the_limit(live):
    """The body is streamed in chunks and never finished: the server must answer once the running total
    passes the limit, before the client is done (it would otherwise wait for the rest forever)."""
    base_url, _ = live
    with _connect(base_url) as sock:
        sock.sendall(_head("/v1/chat/completions", "application/json"))
        sock.sendall(_chunk(b'{"model": "tiny", "prompt": "'))
        for _ in range(BODY_LIMIT // 8192 + 2):
            sock.sendall(_chunk(b"x" * 8192))
        _assert_413(*_read_response(sock), BODY_LIMIT)
    _still_serves(base_url)


def test_chunked_upload_is_cut_off_once_past_the_file_limit(live):
    base_url, _ = live
    boundary = "b0undary"
    with _connect(base_url) as sock:
        sock.sendall(_head("/v1/files", f"multipart/form-data; boundary={boundary}"))
        sock.sendall(_chunk(f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b.jsonl"\r\n'
                            f"Content-Type: application/octet-stream\r\n\r\n".encode()))
        line = json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": CHAT})
        block = ((line + "\n") * (8192 // len(line))).encode()
        for _ in range(FILE_LIMIT // len(block) + 2):
            sock.sendall(_chunk(block))
        _assert_413(*_read_response(sock), FILE_LIMIT)
    _still_serves(base_url)


def test_oversized_bodies_from_an_ordinary_client(live):
    """httpx sends the whole body before reading: the server discards the rest of an oversized one, answers
    413, and the same keep-alive connection then carries a normal request. An upload between the two
    limits is accepted: files have their own limit."""
    base_url, _ = live

    def chunks(total: int):
        for _ in range(total // 16384):
            yield b"x" * 16384

    with httpx.Client(base_url=base_url, timeout=30) as client:
        r = client.post("/v1/chat/completions", content=chunks(4 * BODY_LIMIT),
                        headers={"content-type": "application/json"})
        _assert_413(r.status_code, r.json(), BODY_LIMIT)
        r = client.post("/v1/chat/completions", content=b" " * (BODY_LIMIT + 1),
                        headers={"content-type": "application/json"})
        _assert_413(r.status_code, r.json(), BODY_LIMIT)
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        line = json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": CHAT})
        content = ((line + "\n") * (2 * BODY_LIMIT // len(line))).encode()
        r = client.post("/v1/files", files={"file": ("b.jsonl", content)}, data={"purpose": "batch"})
        assert r.status_code == 200 and r.json()["bytes"] == len(content)
        r = client.post("/v1/files", files={"file": ("b.jsonl", content * 3)}, data={"purpose": "batch"})
        _assert_413(r.status_code, r.json(), FILE_LIMIT)
        assert r.json()["error"]["param"] == "file"
