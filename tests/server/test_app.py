"""The server end to end: a live uvicorn on 127.0.0.1 driven by the official openai client (strict)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from openr2 import billing
from openr2.engine.usage import Usage
from openr2.server.db import SQLiteDatabase
from openr2.server.ledger import Ledger
from openr2.server.shared_ratelimit import SharedRateLimiter


def _client(base_url, key="unused"):
    return openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, _strict_response_validation=True)


def test_models_and_health(live):
    base_url, _ = live
    assert [m.id for m in _client(base_url).models.list().data] == ["tiny", "deepseek-chat", "deepseek-reasoner"]
    assert httpx.get(base_url + "/v1/models").json()["data"][0]["max_model_len"] == 512  # vLLM's field
    assert httpx.get(base_url + "/health").json()["status"] == "ok"


def test_model_retrieve(live):
    """client.models.retrieve: the served model's object (what /v1/models lists); OpenAI's 404 otherwise."""
    base_url, _ = live
    client = _client(base_url)
    model = client.models.retrieve("tiny")
    assert model.id == "tiny" and model.object == "model"
    assert httpx.get(base_url + "/v1/models/tiny").json() == httpx.get(base_url + "/v1/models").json()["data"][0]
    for name in ("nope", "deepseek-ai/DeepSeek-R1", "tiny/"):
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve(name)
        assert err.value.code == "model_not_found" and err.value.body["param"] == "model"
        assert name in err.value.message
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=1).choices


def test_chat_non_stream_has_full_usage_and_reasoning(live):
    base_url, _ = live
    resp = _client(base_url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=8, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason in ("length", "stop")
    u = resp.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens <= 8
    assert u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens == u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens == u.prompt_cache_hit_tokens
    # the R1 prompt opens <think>: without </think> the whole output is reasoning
    assert choice.message.reasoning_content is not None or choice.message.content is not None
    assert u.completion_tokens_details.reasoning_tokens <= u.completion_tokens


def test_chat_stream_matches_non_stream_and_ends_with_usage(live):
    base_url, _ = live
    client = _client(base_url)
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Count: 1 2 3"}], max_tokens=10,
                  temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == (whole.choices[0].message.reasoning_content or "")
    assert content == (whole.choices[0].message.content or "")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_completions(live):
    base_url, _ = live
    resp = _client(base_url).completions.create(model="tiny", prompt=["The answer is", "What is"], max_tokens=5,
                                                temperature=0)
    assert len(resp.choices) == 2 and resp.usage.completion_tokens == 10
    # billed on the in-process engine's own counts, each prompt's row saying so
    by_source = httpx.get(base_url + "/v1/usage", params={"group_by": "source"}).json()["data"]
    assert [r["usage_source"] for r in by_source] == ["engine"] and by_source[0]["requests"] >= 2
    bad = httpx.get(base_url + "/v1/usage", params={"group_by": "upstream"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"


def _totals(base_url):
    rows = httpx.get(base_url + "/v1/usage").json()["data"]
    return rows[0] if rows else {"cost_pico_usd": 0, "prompt_tokens": 0, "requests": 0}


def test_repeated_prompt_hits_the_cache_and_is_billed_exactly(live):
    base_url, _ = live
    client = _client(base_url)
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "The answer is 42. " * 20}], max_tokens=2,
                  temperature=0)
    client.chat.completions.create(**kwargs)
    before = _totals(base_url)
    again = client.chat.completions.create(**kwargs)
    after = _totals(base_url)
    u = again.usage
    assert u.prompt_cache_hit_tokens > 0
    cost = billing.PriceTable().cost(Usage(u.prompt_tokens, u.prompt_cache_hit_tokens, u.completion_tokens))
    # miss tokens at $0.14/M, hit tokens at $0.014/M, output at $0.28/M: in pico-dollars, to the token
    assert cost == (u.prompt_cache_miss_tokens * 140_000 + u.prompt_cache_hit_tokens * 14_000
                    + u.completion_tokens * 280_000)
    assert after["cost_pico_usd"] - before["cost_pico_usd"] == cost
    assert after["requests"] - before["requests"] == 1


def test_errors_are_openai_json(live):
    base_url, _ = live
    client = _client(base_url)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi " * 600}],
                                       max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    r = httpx.post(base_url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_disconnect_mid_stream_aborts_and_bills(live):
    base_url, server = live
    before = server.ledger.usage_report()[0]["requests"] if server.ledger.usage_report() else 0
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break  # hang up after a few events
    deadline = time.time() + 10
    engine = server.engine.engine
    while (engine.has_unfinished_requests() or server.ledger.usage_report()[0]["requests"] == before) \
            and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.has_unfinished_requests()
    assert engine.blocks.num_free == engine.pool.num_blocks
    assert server.ledger.usage_report()[0]["requests"] == before + 1


def test_a_stream_is_billed_off_the_event_loop(live, monkeypatch):
    """The ledger commit (an fsync) runs in a worker thread, so it never holds up the other streams."""
    base_url, server = live
    bill, on_loop = server.bill, []

    def spy(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no event loop in this thread: a worker
            on_loop.append(False)
        return bill(*args, **kwargs)

    monkeypatch.setattr(server, "bill", spy)
    chunks = list(_client(base_url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True))
    deadline = time.time() + 10
    while not on_loop and time.time() < deadline:
        time.sleep(0.01)
    assert chunks and on_loop == [False]


@pytest.mark.parametrize("slow_part", ["rate limit", "key lookup", "file listing"])
def test_a_slow_database_does_not_stall_other_streams(live, tmp_path, monkeypatch, slow_part):
    """Each request reads the database: its key (has_keys, verify_key), on replicas its rate limits
    (shared_ratelimit.py), and the files and batches routes their rows; round trips over the network on
    PostgreSQL. While one request waits on a slow database there, another request's stream keeps flowing."""
    base_url, server = live
    slow, stalls = threading.Event(), []

    def slowed(call):
        def run(*args, **kwargs):
            if slow.is_set():
                began = time.monotonic()
                time.sleep(0.6)  # a database under load, or far away
                stalls.append((began, time.monotonic()))
            return call(*args, **kwargs)
        return run

    limiter = None
    if slow_part == "rate limit":
        Ledger(tmp_path / "rl.sqlite").close()  # the schema
        limiter = SharedRateLimiter(SQLiteDatabase(tmp_path / "rl.sqlite"), requests_per_min=1000)
        monkeypatch.setattr(limiter, "acquire", slowed(limiter.acquire))
        monkeypatch.setattr(server, "limiter", limiter)
    elif slow_part == "key lookup":
        monkeypatch.setattr(server.ledger, "has_keys", slowed(server.ledger.has_keys))
    else:
        monkeypatch.setattr(server.ledger, "list_files", slowed(server.ledger.list_files))
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    send = (lambda: httpx.get(base_url + "/v1/files", timeout=60)) if slow_part == "file listing" else \
        (lambda: httpx.post(base_url + "/v1/chat/completions", json=chat, timeout=60))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    arrivals, other = [], []
    try:
        with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                arrivals.append(time.monotonic())
                if i == 2:  # streaming: now another request arrives, and its database read is slow
                    slow.set()
                    thread = threading.Thread(target=lambda: other.append(send()))
                    thread.start()
        thread.join(timeout=30)
    finally:
        if limiter is not None:
            limiter.close()
    assert other and other[0].status_code == 200
    ((began, ended),) = stalls
    during = [t for t in arrivals if began < t < ended]
    # on the loop, the stall would hold every stream: no chunk at all inside it (the test then fails with 0)
    assert len(during) >= 10, f"the stream stalled while another request read the database ({len(during)} chunks)"


def _batch_file(n: int, max_tokens: int = 4) -> bytes:
    lines = [json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "tiny", "max_tokens": max_tokens, "temperature": 0,
                                  "messages": [{"role": "user", "content": f"What is {i}+{i}?"}]}})
             for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def _wait_for_batch(client, batch_id, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} did not finish: {batch.status}")


def test_batch_of_20_end_to_end_at_half_price(live):
    base_url, _ = live
    client = _client(base_url)
    before = _totals(base_url)
    upload = client.files.create(file=("batch.jsonl", _batch_file(20)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = _wait_for_batch(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 20 and batch.request_counts.failed == 0
    lines = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(f"req-{i}" for i in range(20))
    usage = [x["response"]["body"]["usage"] for x in lines]
    full_price = sum(billing.PriceTable().cost(Usage(u["prompt_tokens"], u["prompt_cache_hit_tokens"],
                                                             u["completion_tokens"])) for u in usage)
    after = _totals(base_url)
    assert after["requests"] - before["requests"] == 20
    assert after["cost_pico_usd"] - before["cost_pico_usd"] == full_price // 2  # batch jobs are 50% off


def test_files_are_scoped_and_errors_are_clear(live):
    base_url, _ = live
    client = _client(base_url)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    bad = client.files.create(file=("bad.jsonl", b"not json\n"), purpose="batch")
    batch = _wait_for_batch(client, client.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions",
                                                          completion_window="24h").id)
    assert batch.status == "failed" and batch.errors.data


def test_keys_required_once_one_exists(live):
    base_url, server = live
    key_id, secret = server.ledger.create_key("alice")
    try:
        with pytest.raises(openai.AuthenticationError):
            _client(base_url, "sk-wrong").models.list()
        assert httpx.get(base_url + "/v1/models").status_code == 401
        assert _client(base_url, secret).models.list().data[0].id == "tiny"
        assert httpx.get(base_url + "/v1/usage", headers={"authorization": f"Bearer {secret}"}).json()["data"] == []
    finally:
        server.ledger.revoke_key(key_id)
