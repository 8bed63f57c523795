"""The gateway in front of real openr2 upstream processes: the official client gets the same answers and usage as
from an upstream directly, the ledger holds what clients were told, prefix affinity makes upstream cache hits
(billed as hits), bad requests stay 4xx, and killing an upstream with SIGKILL mid-load loses nothing that had
not started streaming and bills nothing twice."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import anthropic
import httpx
import openai
import pytest

from openr2.server.upstreams import Upstream
from tests.server._live import free_port
from tests.server._upstreams import ROOT, gateway, start_upstream, stop, wait_ready

pytestmark = pytest.mark.slow
USER = [{"role": "user", "content": "What is 2+2?"}]


def _client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                         _strict_response_validation=True, timeout=120)


@pytest.fixture(scope="module")
def upstreams(ckpt, tmp_path_factory):
    """Three openr2 servers: A and B shared, C (two sequences at a time) for the kill test."""
    started = [start_upstream(ckpt, tmp_path_factory.mktemp("up-a")),
               start_upstream(ckpt, tmp_path_factory.mktemp("up-b")),
               start_upstream(ckpt, tmp_path_factory.mktemp("up-c"), "--max-num-seqs", "2")]
    try:
        for proc, url in started:
            wait_ready(proc, url)
        yield started
    finally:
        for proc, _ in started:
            stop(proc)


@pytest.fixture(scope="module")
def gw(ckpt, upstreams, tmp_path_factory):
    """(base_url, Server, data dir) of a gateway over A and B."""
    data = tmp_path_factory.mktemp("gw")
    with gateway(ckpt, data, [upstreams[0][1], upstreams[1][1]], affinity_tokens=32) as (base_url, server):
        yield base_url, server, data


def _rows(data) -> dict:
    db = sqlite3.connect(data / "ledger.sqlite")
    try:
        return {r[0]: r[1:] for r in db.execute(
            "SELECT request_id, prompt_tokens, cached_prompt_tokens, completion_tokens, reasoning_tokens FROM usage")}
    finally:
        db.close()


def _row(data, request_id: str) -> tuple:
    """A request's ledger row; a stream is billed just after its [DONE] went out, so wait a moment for it."""
    deadline = time.time() + 10
    while (row := _rows(data).get(request_id)) is None and time.time() < deadline:
        time.sleep(0.02)
    return row


def _usage(u) -> tuple:
    return (u.prompt_tokens, u.prompt_tokens_details.cached_tokens, u.completion_tokens,
            u.completion_tokens_details.reasoning_tokens)


def test_same_answers_and_usage_as_the_upstream(gw, upstreams):
    base_url, _, data = gw
    direct, through = _client(upstreams[0][1]), _client(base_url)
    for messages in (USER, [{"role": "user", "content": "Name three colours."}]):
        kwargs = dict(model="tiny", messages=messages, max_tokens=12, temperature=0)
        a, b = direct.chat.completions.create(**kwargs), through.chat.completions.create(**kwargs)
        assert b.choices[0].message.content == a.choices[0].message.content
        assert b.choices[0].message.model_extra["reasoning_content"] == \
            a.choices[0].message.model_extra["reasoning_content"]
        assert b.choices[0].finish_reason == a.choices[0].finish_reason
        # all counts equal but the cache hits: the gateway's request may hit the upstream's cache of the direct one
        assert _usage(b.usage)[0::2] == _usage(a.usage)[0::2] and _usage(b.usage)[2] == _usage(a.usage)[2]
        assert _rows(data)[b.id] == _usage(b.usage)  # the ledger holds what the client was told

    text = dict(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    a, b = direct.completions.create(**text), through.completions.create(**text)
    assert b.choices[0].text == a.choices[0].text and b.choices[0].finish_reason == a.choices[0].finish_reason
    assert (b.usage.prompt_tokens, b.usage.completion_tokens) == (a.usage.prompt_tokens, a.usage.completion_tokens)
    assert _rows(data)[b.id + "-0"][0::2] == (b.usage.prompt_tokens, b.usage.completion_tokens)


def test_several_samples_and_the_anthropic_route_through_the_gateway(gw, upstreams):
    base_url, _, data = gw
    kwargs = dict(model="tiny", messages=USER, max_tokens=6, temperature=1, seed=7, n=2)
    a = _client(upstreams[0][1]).chat.completions.create(**kwargs)
    b = _client(base_url).chat.completions.create(**kwargs)
    assert [c.message.model_extra["reasoning_content"] for c in b.choices] == \
        [c.message.model_extra["reasoning_content"] for c in a.choices]  # the same seeded samples
    assert b.usage.completion_tokens == a.usage.completion_tokens
    message = anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0).messages.create(
        model="tiny", max_tokens=5, messages=[{"role": "user", "content": "What is 2+2?"}])
    assert message.usage.output_tokens == 5 and message.stop_reason == "max_tokens"
    assert _row(data, message.id)[2] == 5


def test_logprobs_through_the_gateway_are_the_upstreams(gw, upstreams):
    """Chat (whole and streamed) and text completions: the same tokens, logprobs and alternatives as from the
    upstream directly (the gateway maps the upstream's token texts back to ids and shows them as it does its
    own engine's); the completion count is the number of tokens."""
    base_url, _, data = gw
    direct, through = _client(upstreams[0][1]), _client(base_url)

    def chat_logprobs(choice_logprobs):
        return [(t.token, t.logprob, t.bytes, [(x.token, x.logprob) for x in t.top_logprobs])
                for t in choice_logprobs.content]

    kwargs = dict(model="tiny", messages=USER, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    a, b = direct.chat.completions.create(**kwargs), through.chat.completions.create(**kwargs)
    want = chat_logprobs(a.choices[0].logprobs)
    assert len(want) == a.usage.completion_tokens == 8 and all(len(t[3]) == 3 for t in want)
    assert chat_logprobs(b.choices[0].logprobs) == want
    assert b.usage.completion_tokens == 8 and _rows(data)[b.id][2] == 8
    streamed = [t for chunk in through.chat.completions.create(stream=True, **kwargs) for c in chunk.choices
                if c.logprobs for t in chat_logprobs(c.logprobs)]
    assert streamed == want
    # logprobs without alternatives
    a = direct.chat.completions.create(**{**kwargs, "top_logprobs": None})
    b = through.chat.completions.create(**{**kwargs, "top_logprobs": None})
    assert chat_logprobs(b.choices[0].logprobs) == chat_logprobs(a.choices[0].logprobs)

    text = dict(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2)
    a, b = direct.completions.create(**text), through.completions.create(**text)
    assert b.choices[0].logprobs.model_dump() == a.choices[0].logprobs.model_dump()
    assert len(b.choices[0].logprobs.tokens) == 6
    # streamed: every token's logprobs, also those whose text is held back (part of a UTF-8 character), which
    # openr2's stream sends in a chunk of empty text (the gateway reads the upstream's stream: it needs them all)
    for url in (upstreams[0][1], base_url):  # (the strict client's Completion type refuses a chunk's null finish)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **{**text, "max_tokens": 8})
                  if c.choices]
        whole = client.completions.create(**{**text, "max_tokens": 8}).choices[0]
        assert [t for c in chunks for t in c.logprobs.tokens] == whole.logprobs.tokens
        assert [x for c in chunks for x in c.logprobs.token_logprobs] == whole.logprobs.token_logprobs
        assert "".join(c.text for c in chunks) == whole.text


def _streamed(client, **kwargs):
    deltas, reasoning, usage, finish = [], [], None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            deltas.append(choice.delta.content or "")
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
            finish = choice.finish_reason or finish
    return chunk.id, "".join(deltas), "".join(reasoning), finish, usage


def test_streams_pass_through_with_the_same_chunks_and_usage(gw, upstreams):
    base_url, _, data = gw
    kwargs = dict(model="tiny", messages=USER, max_tokens=14, temperature=0)
    _, *direct = _streamed(_client(upstreams[1][1]), **kwargs)
    rid, *through = _streamed(_client(base_url), **kwargs)
    assert through[:3] == direct[:3]
    assert _usage(through[3])[0::2] == _usage(direct[3])[0::2]  # cache hits aside (see above)
    assert _row(data, rid) == _usage(through[3])


def test_prefix_affinity_hits_the_upstream_cache_and_bills_the_hit(gw):
    base_url, server, data = gw
    client = _client(base_url)
    # longer than affinity_tokens (32) and than two 16-token blocks, so the second request hits
    messages = [{"role": "user", "content": "The answer is 42. " * 12}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= 32  # the same upstream took both
    assert _rows(data)[second.id][1] == second.usage.prompt_tokens_details.cached_tokens


def test_cache_salt_keeps_keys_apart_in_an_openr2_upstreams_cache(ckpt, upstreams, tmp_path):
    url = upstreams[0][1]
    with gateway(ckpt, tmp_path, [Upstream(url, cache_salt=True)]) as (base_url, server):
        (_, alice), (_, bob) = server.ledger.create_key("alice"), server.ledger.create_key("bob")
        messages = [{"role": "user", "content": "Salted prefix, salted answer. " * 8}]

        def cached(secret) -> int:
            client = openai.OpenAI(base_url=base_url + "/v1", api_key=secret, max_retries=0)
            resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
            return resp.usage.prompt_tokens_details.cached_tokens

        assert cached(alice) == 0 and cached(alice) >= 32  # the key's own blocks are reused
        assert cached(bob) == 0  # never another key's
    # the upstream checks the field as any request's: a bad one is a 400 naming it
    resp = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "cache_salt": ""})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "cache_salt"


def test_openr2_serve_upstream_as_a_process(ckpt, upstreams, tmp_path):
    """The command a deployment runs: `openr2 serve --model CKPT --upstream URL`, answering and billing."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "openr2", "serve", "--model", str(ckpt), "--served-model-name",
                             "tiny", "--upstream", upstreams[0][1], "--port", str(port), "--data-dir", str(tmp_path)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(proc, base_url)
        resp = _client(base_url).chat.completions.create(model="tiny", messages=USER, max_tokens=4, temperature=0)
        assert resp.usage.completion_tokens == 4 or resp.choices[0].finish_reason == "stop"
        assert _row(tmp_path, resp.id) == _usage(resp.usage)
    finally:
        stop(proc)
    assert proc.returncode in (0, -15)  # SIGTERM: uvicorn shuts down, then re-raises the signal


def test_bad_requests_are_4xx_and_upstream_refusals_pass_through(gw, monkeypatch):
    base_url, server, _ = gw
    resp = httpx.post(base_url + "/v1/chat/completions", json={"model": "tiny", "messages": USER, "top_p": 7})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "top_p"
    # constrained decoding runs in openr2's own sampler: refused, not silently unconstrained
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    resp = httpx.post(base_url + "/v1/chat/completions", json={"model": "tiny", "messages": USER, "response_format": fmt})
    assert resp.status_code == 400 and "gateway" in resp.json()["error"]["message"]
    # the gateway's own context check (the length it learnt from the upstreams' /v1/models)
    resp = httpx.post(base_url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4000})
    assert resp.status_code == 400
    # a gateway told a longer context than its upstreams have: the upstream's own 400 comes through, not a 5xx
    monkeypatch.setattr(server.engine, "_max_model_len", 100_000)
    resp = httpx.post(base_url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4000})
    assert resp.status_code == 400 and resp.json()["error"]["message"].startswith("upstream: ")
    assert all(s.healthy for s in server.engine.pool.states)  # the request's fault, not the upstream's
    monkeypatch.undo()
    assert _client(base_url).chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices


def test_a_batch_runs_through_the_upstreams(gw):
    base_url, _, data = gw
    client = _client(base_url)
    lines = b"".join(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "tiny", "max_tokens": 5, "temperature": 0,
                                          "messages": [{"role": "user", "content": f"Count to {i}"}]}}).encode()
                     + b"\n" for i in range(6))
    upload = client.files.create(file=("batch.jsonl", lines), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.time() + 120
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.time() < deadline, batch.status
        time.sleep(0.1)
    assert batch.status == "completed" and batch.request_counts.completed == 6
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in out) == [f"req-{i}" for i in range(6)]
    rows = _rows(data)
    for x in out:
        body = x["response"]["body"]
        assert rows[body["id"]][2] == body["usage"]["completion_tokens"] == 5


def _prompt_for(server, state, tag: str) -> list:
    """Messages whose prompt prefix the pool sends to `state` (prefix affinity, never spilling over)."""
    for k in range(200):
        messages = [{"role": "user", "content": f"{k}{tag} question: what is {k}+{k}?"}]
        _, _, ids, _ = server.prepare_chat({"model": "tiny", "messages": messages})
        if server.engine.pool.pick(ids) is state:
            return messages
    raise AssertionError("no prompt prefers that upstream")


def test_killing_an_upstream_mid_load_loses_and_double_bills_nothing(ckpt, upstreams, tmp_path, caplog):
    (victim, victim_url), (_, survivor_url) = upstreams[2], upstreams[1]
    with gateway(ckpt, tmp_path, [victim_url, survivor_url], affinity_tokens=12, affinity_slack=1000) as (
            base_url, server):
        client = _client(base_url)
        victim_state = server.engine.pool.states[0]
        to_victim = _prompt_for(server, victim_state, "v")
        to_survivor = _prompt_for(server, server.engine.pool.states[1], "s")
        kwargs = dict(model="tiny", max_tokens=300, temperature=0, extra_body={"ignore_eos": True})
        results, received = {}, {}

        def stream(i, messages):
            rid, received[i] = None, 0
            try:
                for chunk in client.chat.completions.create(messages=messages, stream=True,
                                                            stream_options={"include_usage": True}, **kwargs):
                    rid = chunk.id
                    if chunk.usage is not None:
                        results[i] = ("completed", rid, chunk.usage)
                        return
                    received[i] += sum(bool(c.delta.content or (c.delta.model_extra or {}).get("reasoning_content"))
                                       for c in chunk.choices)
                results[i] = ("no usage", rid, None)
            except openai.APIError as e:
                results[i] = ("error", rid, e)

        def whole(i, messages):
            try:
                resp = client.chat.completions.create(messages=messages, **kwargs)
                results[i] = ("completed", resp.id, resp.usage)
            except openai.APIError as e:
                results[i] = ("error", None, e)

        def start(i, target, messages):
            thread = threading.Thread(target=target, args=(i, messages))
            thread.start()
            return thread

        # the victim runs two sequences at a time: request 0 streams from it and request 9 (not streamed)
        # generates beside it; the next ones queue behind them without a token; then it dies
        threads = [start(0, stream, to_victim), start(9, whole, to_victim)]
        deadline = time.time() + 120
        while received.get(0, 0) < 3:
            assert time.time() < deadline and 0 not in results, "the first stream never started"
            time.sleep(0.01)
        threads += [start(i, stream if i % 2 else whole, to_victim) for i in range(1, 7)]
        threads += [start(i, stream if i % 2 else whole, to_survivor) for i in range(7, 9)]
        while victim_state.outstanding < 8:
            assert time.time() < deadline and 0 not in results, "the queued requests never reached the victim"
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        for t in threads:
            t.join(timeout=240)
        assert len(results) == 10

        status = {i: r[0] for i, r in results.items()}
        # the one that had streamed ends with an error event; every other one completes on the survivor,
        # request 9 started again there from scratch (nothing of it had reached its client)
        assert status == {0: "error", **{i: "completed" for i in range(1, 10)}}, results
        assert all(results[i][2].completion_tokens == 300 for i in range(1, 10))
        assert any(results[9][1] in r.getMessage() and "failed midway" in r.getMessage() for r in caplog.records)
        assert not victim_state.healthy

        for r in results.values():
            _row(tmp_path, r[1])  # streams are billed just after their end
        rows = _rows(tmp_path)
        assert len(rows) == 10 and {r[1] for r in results.values()} == set(rows)  # one bill each, none twice
        for i in range(1, 10):
            assert rows[results[i][1]] == _usage(results[i][2])
        # the cut stream is billed for what was delivered: at least the deltas received, not the whole answer
        assert received[0] <= rows[results[0][1]][2] < 300
        # the gateway goes on over the survivor
        assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=3).usage.completion_tokens
