"""The gateway over upstreams that speak other dialects of the completions stream, replayed in their shape
(written after those servers' source, not captured live here): llama.cpp's server (`timings` with its cache
count), llama-cpp-python's (no usage at all, no /health), a stream cut by an error event. Checked: the
reasoning split the gateway applies to inline `<think>`, usage counted with the tokenizer where the upstream
reports none, cache hits billed only where reported, per-upstream prices, and a stream that fails midway
billed for what it delivered. The replayed server is a real HTTP server in this process."""

import asyncio
import json
import sqlite3
import time

import anthropic
import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from openr2 import billing
from openr2.chat_format import render_chat
from openr2.engine.usage import Usage
from openr2.server.app import ServerConfig
from openr2.server.gateway import _sse_events
from openr2.server.upstreams import Upstream
from tests.server._live import run_app
from tests.server._upstreams import gateway
from tests.tokenizer_utils import tiny_tokenizer

ANSWER = ["Two", " and", " two", "</think>", "The", " answer", " is", " 4."]
USER = [{"role": "user", "content": "What is 2+2?"}]


def _chunk(text: str, finish: str | None = None, logprobs: dict | None = None, **extra) -> str:
    """One llama.cpp /v1/completions stream chunk (its field order and extras)."""
    body = {"choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}],
            "created": 1733000000, "id": "chatcmpl-replay", "model": "gpt-3.5-turbo", "system_fingerprint": "b6100",
            "object": "text_completion", **extra}
    return f"data: {json.dumps(body)}\n\n"


def _by_text(piece: str) -> dict:
    """Legacy logprobs naming the piece's tokens by text, as llama.cpp's server does (no token ids)."""
    tok = tiny_tokenizer()
    texts = [tok.decode([i]) for i in tok.encode(piece)]
    return {"tokens": texts, "token_logprobs": [-0.5] * len(texts), "text_offset": [0] * len(texts),
            "top_logprobs": [{t: -0.5, "<｜User｜>": -1.5} for t in texts]}


def replay_app(dialect: str) -> FastAPI:
    app = FastAPI()
    app.state.bodies, app.state.closed, app.state.sick = [], asyncio.Event(), False

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "replay.gguf", "object": "model", "owned_by": "me",
                                            "meta": {"n_ctx_train": 2048}}]}

    if dialect != "llama-cpp-python":  # that server has no /health: the pool falls back to /v1/models
        @app.get("/health")
        async def health():
            if app.state.sick:
                return JSONResponse({"status": "failed"}, status_code=503)
            return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.bodies.append(body)
        if body.get("max_tokens", 16) > 100:
            return JSONResponse({"error": {"code": 400, "message": "too long", "type": "invalid_request_error"}},
                                status_code=400)

        async def events():
            if body.get("max_tokens") == 7:  # a request this upstream fails, in band, before any token
                yield f"data: {json.dumps({'error': {'code': 500, 'message': 'poisoned'}})}\n\n"
                return
            for piece in ANSWER[:-1]:
                yield _chunk(piece, logprobs=_by_text(piece) if body.get("logprobs") is not None else None)
                if dialect == "stalls" and piece == "</think>":
                    try:
                        await asyncio.sleep(60)  # until the gateway hangs up
                    finally:
                        app.state.closed.set()
                if dialect == "error-midway" and piece == "</think>":
                    yield f"data: {json.dumps({'error': {'code': 500, 'message': 'slot failed'}})}\n\n"
                    return
            if dialect == "llama.cpp":  # the finish chunk carries usage and timings (12 of 20 prompt tokens cached)
                yield _chunk(ANSWER[-1], "stop", usage={"completion_tokens": 8, "prompt_tokens": 20, "total_tokens": 28},
                             timings={"cache_n": 12, "prompt_n": 8, "predicted_n": 8})
            else:
                yield _chunk(ANSWER[-1], "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer().save_pretrained(path)
    return path


def _client(base_url):
    return _client_with(base_url, "unused")


def _client_with(base_url, key):
    return openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, _strict_response_validation=True)


def _cost(data, request_id) -> int:
    db = sqlite3.connect(data / "ledger.sqlite")
    (cost,) = db.execute("SELECT cost_pico_usd FROM usage WHERE request_id = ?", (request_id,)).fetchone()
    db.close()
    return cost


def _source(data, request_id) -> str:
    db = sqlite3.connect(data / "ledger.sqlite")
    (source,) = db.execute("SELECT usage_source FROM usage WHERE request_id = ?", (request_id,)).fetchone()
    db.close()
    return source


def _row(data, request_id) -> tuple:
    deadline = time.time() + 10
    while time.time() < deadline:
        db = sqlite3.connect(data / "ledger.sqlite")
        row = db.execute("SELECT prompt_tokens, cached_prompt_tokens, completion_tokens, reasoning_tokens "
                         "FROM usage WHERE request_id = ?", (request_id,)).fetchone()
        db.close()
        if row:
            return row
        time.sleep(0.02)
    raise AssertionError(f"{request_id} was never billed")


# cheaper than the server's default table, as serve requires (upstreams.check_prices)
PRICES = billing.PriceTable(input_miss_micro_usd_per_mtok=100_000, input_hit_micro_usd_per_mtok=10_000,
                            output_micro_usd_per_mtok=200_000)


def test_llama_cpp_usage_and_timings_and_the_reasoning_split(ckpt, tmp_path):
    app = replay_app("llama.cpp")
    with run_app(app) as up, gateway(ckpt, tmp_path, [Upstream(up, prices=PRICES)], ServerConfig(model_name="tiny")
                                     ) as (base_url, server):
        resp = _client(base_url).chat.completions.create(model="tiny", messages=USER, max_tokens=10)
        message = resp.choices[0].message
        assert (message.model_extra["reasoning_content"], message.content) == ("Two and two", "The answer is 4.")
        assert resp.choices[0].finish_reason == "stop"
        assert (resp.usage.prompt_tokens, resp.usage.prompt_tokens_details.cached_tokens,
                resp.usage.completion_tokens) == (20, 12, 8)  # llama.cpp's counts, its cache hits priced
        assert _row(tmp_path, resp.id)[:3] == (20, 12, 8)
        # billed at that upstream's own prices, the cache hits at its hit price
        assert _cost(tmp_path, resp.id) == PRICES.cost(Usage(20, 12, 8)) == 8 * 100_000 + 12 * 10_000 + 8 * 200_000
        assert _source(tmp_path, resp.id) == "upstream"  # the ledger row says whose counts it bills
        sent = app.state.bodies[-1]
        assert sent["model"] == "replay.gguf" and sent["stream"] and sent["stream_options"] == {"include_usage": True}
        assert "cache_salt" not in sent  # only where configured
        prompt = render_chat(USER, server.tokenizer)
        assert sent["prompt"] == server.tokenizer.encode(prompt)  # the gateway's own rendering, as token ids
        assert server.engine.max_model_len == 2048  # learnt from llama.cpp's /v1/models meta
        metrics = httpx.get(base_url + "/metrics").text
        assert f'openr2_upstream_healthy{{upstream="{up}"}} 1.0' in metrics
        assert 'openr2_usage_source_total{source="upstream"} 1.0' in metrics
        # a batch line through that upstream: its prices at the batch discount
        client = _client(base_url)
        line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "tiny", "messages": USER, "max_tokens": 10}}
        upload = client.files.create(file=("b.jsonl", json.dumps(line).encode() + b"\n"), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.time() + 60
        while (batch := client.batches.retrieve(batch.id)).status != "completed":
            assert time.time() < deadline and batch.status not in ("failed", "cancelled"), batch.status
            time.sleep(0.05)
        (out,) = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
        assert _cost(tmp_path, out["response"]["body"]["id"]) == PRICES.cost(Usage(20, 12, 8), batch=True)
        assert _source(tmp_path, out["response"]["body"]["id"]) == "upstream"


def test_an_upstream_without_usage_is_counted_with_the_tokenizer(ckpt, tmp_path):
    with run_app(replay_app("llama-cpp-python")) as up, gateway(ckpt, tmp_path, [up]) as (base_url, server):
        chunks = list(_client(base_url).chat.completions.create(model="tiny", messages=USER, max_tokens=10,
                                                                stream=True, stream_options={"include_usage": True}))
        usage = chunks[-1].usage
        tok = server.tokenizer
        prompt_ids = tok.encode(render_chat(USER, tok))
        assert usage.prompt_tokens == len(prompt_ids)
        assert usage.completion_tokens == len(tok.encode("".join(ANSWER)))
        assert usage.completion_tokens_details.reasoning_tokens == len(tok.encode("Two and two"))
        assert usage.prompt_tokens_details.cached_tokens == 0  # nothing reported: never priced as a hit
        reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                            for c in chunks if c.choices)
        assert reasoning == "Two and two"
        assert _row(tmp_path, chunks[0].id) == (usage.prompt_tokens, 0, usage.completion_tokens,
                                                usage.completion_tokens_details.reasoning_tokens)
        assert 'openr2_usage_source_total{source="local"} 1.0' in httpx.get(base_url + "/metrics").text
        assert _source(tmp_path, chunks[0].id) == "local"
        # an upstream's own 400 comes through as a 400 (and does not take it out)
        resp = httpx.post(base_url + "/v1/chat/completions", json={"model": "tiny", "messages": USER,
                                                                   "max_tokens": 200})
        assert resp.status_code == 400 and resp.json()["error"]["message"] == "upstream: too long"
        assert server.engine.pool.states[0].healthy


def test_an_error_event_midway_ends_the_stream_and_bills_what_was_delivered(ckpt, tmp_path):
    with run_app(replay_app("error-midway")) as up, gateway(ckpt, tmp_path, [up]) as (base_url, server):
        received, rid = [], None
        with pytest.raises(openai.APIError, match="upstream failed mid-answer"):
            for chunk in _client(base_url).chat.completions.create(model="tiny", messages=USER, max_tokens=10,
                                                                   stream=True):
                rid = chunk.id
                received += [c.delta.model_extra.get("reasoning_content") or c.delta.content or ""
                             for c in chunk.choices]
        assert "".join(received) == "Two and two"
        tok = server.tokenizer
        delivered = len(tok.encode("".join(ANSWER[:4])))  # through </think>, what the upstream sent
        assert _row(tmp_path, rid)[2] == delivered


def test_a_client_gone_midway_closes_the_upstream_stream_and_is_billed_what_it_got(ckpt, tmp_path):
    app = replay_app("stalls")
    with run_app(app) as up, gateway(ckpt, tmp_path, [up]) as (base_url, server):
        body = {"model": "tiny", "messages": USER, "max_tokens": 10, "stream": True}
        received = ""
        with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=30) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    rid = chunk["id"]
                    received += "".join(c["delta"].get("reasoning_content") or "" for c in chunk["choices"])
                if received == "Two and two":
                    break  # hang up while the upstream is still generating
        deadline = time.time() + 10
        while not app.state.closed.is_set():  # the gateway closed its upstream request
            assert time.time() < deadline, "the upstream stream was left open"
            time.sleep(0.02)
        tok = server.tokenizer
        assert _row(tmp_path, rid)[2] == len(tok.encode("".join(ANSWER[:4])))  # the text passed on, counted
        assert server.engine.num_running == 0


def test_a_request_every_upstream_fails_takes_none_of_them_out(ckpt, tmp_path):
    apps = [replay_app("llama.cpp"), replay_app("llama.cpp")]
    with run_app(apps[0]) as a, run_app(apps[1]) as b, gateway(ckpt, tmp_path, [a, b]) as (base_url, server):
        resp = httpx.post(base_url + "/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 7})
        assert resp.status_code == 503 and "poisoned" in resp.json()["error"]["message"]
        assert [len(app.state.bodies) for app in apps] == [1, 1]  # tried on each upstream once
        assert all(s.healthy for s in server.engine.pool.states)
        assert _client(base_url).chat.completions.create(model="tiny", messages=USER, max_tokens=9).choices


def test_an_upstream_failing_its_health_check_is_taken_out_and_probed_back_in(ckpt, tmp_path):
    apps = [replay_app("llama.cpp"), replay_app("llama.cpp")]
    with run_app(apps[0]) as a, run_app(apps[1]) as b, gateway(ckpt, tmp_path, [a, b], probe_interval_s=0.1,
                                                               affinity_tokens=0) as (base_url, server):
        first = server.engine.pool.states[0]

        def wait_for(healthy: bool):
            deadline = time.time() + 10
            while first.healthy != healthy:
                assert time.time() < deadline, f"never {'back in' if healthy else 'taken out'}"
                time.sleep(0.02)

        apps[0].state.sick = True
        wait_for(False)
        before = len(apps[0].state.bodies)
        for _ in range(4):  # all to the other one
            assert _client(base_url).chat.completions.create(model="tiny", messages=USER, max_tokens=9).choices
        assert len(apps[0].state.bodies) == before and len(apps[1].state.bodies) >= 4
        apps[0].state.sick = False
        wait_for(True)
        for _ in range(4):  # least outstanding rotates over both again
            _client(base_url).chat.completions.create(model="tiny", messages=USER, max_tokens=9)
        assert len(apps[0].state.bodies) > before


def test_cache_salt_partitions_an_upstream_cache_by_key(ckpt, tmp_path):
    app = replay_app("llama.cpp")
    with run_app(app) as up, gateway(ckpt, tmp_path, [Upstream(up, cache_salt=True)]) as (base_url, server):
        (alice, alice_secret), (bob, bob_secret) = [server.ledger.create_key(name) for name in ("alice", "bob")]
        for secret in (alice_secret, bob_secret, alice_secret):
            _client_with(base_url, secret).chat.completions.create(model="tiny", messages=USER, max_tokens=9)
        salts = [body.get("cache_salt") for body in app.state.bodies]
        assert salts[0] == salts[2] != salts[1] and None not in salts  # one partition per key
        assert not {alice, bob} & set(salts)  # the key ids themselves never leave


def test_no_healthy_upstream_is_a_503(ckpt, tmp_path):
    """Nothing listens on port 9 (discard): the first probe takes the upstream out, requests get a 503."""
    with gateway(ckpt, tmp_path, ["http://127.0.0.1:9"]) as (base_url, server):
        resp = httpx.post(base_url + "/v1/chat/completions", json={"model": "tiny", "messages": USER})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "upstream_error"
        assert not server.engine.pool.states[0].healthy


def test_sse_events_are_grouped_by_read_and_survive_split_lines():
    """...and after [DONE] nothing more is yielded, but the body is read to its end (so that its connection
    goes back to the keep-alive pool)."""
    reads = [b'data: {"a": 1}\r\n\r\ndata: {"b"', b': 2}\n\n: a comment\n\ndata: {"c": 3}\n\ndata: [DONE]\n\n'
             b'data: {"late": 1}\n\n', b'data: {"later": 2}\n\n']
    read = []

    async def body():
        for piece in reads:
            read.append(piece)
            yield piece

    async def collect():
        return [events async for events in _sse_events(body())]

    assert asyncio.run(collect()) == [[b'{"a": 1}'], [b'{"b": 2}', b'{"c": 3}', b"[DONE]"]]
    assert read == reads


def test_logprobs_named_by_text_are_mapped_back_to_ids(ckpt, tmp_path):
    """An upstream that names logprob tokens by their text (llama.cpp's server): the gateway finds their ids
    (the tokenizer's decode of each id alone), so the client sees the same tokens and alternatives."""
    with run_app(replay_app("llama-cpp-python")) as up, gateway(ckpt, tmp_path, [up]) as (base_url, server):
        resp = _client(base_url).chat.completions.create(model="tiny", messages=USER, max_tokens=10, logprobs=True,
                                                         top_logprobs=1)
        tok = server.tokenizer
        want = [tok.decode([i]) for piece in ANSWER[:-1] for i in tok.encode(piece)]
        content = resp.choices[0].logprobs.content
        assert [t.token for t in content] == want and {t.logprob for t in content} == {-0.5}
        assert [[(x.token, x.logprob) for x in t.top_logprobs] for t in content] == [[(t, -0.5)] for t in want]
        # the completion count is the tokens the logprobs named (the upstream reported none)
        assert resp.usage.completion_tokens == len(want)


def test_one_gateway_serves_several_models_each_on_its_own_upstreams(ckpt, tmp_path):
    """Upstreams configured with a served_model_name serve that model at the gateway, the others its own:
    /v1/models lists both, each request goes only to its model's upstreams (chat, completions, Anthropic's
    messages), the ledger records the model asked for, and a model nobody serves is a 404."""
    alpha, own = replay_app("llama.cpp"), replay_app("llama.cpp")
    with run_app(alpha) as a, run_app(own) as b, \
            gateway(ckpt, tmp_path, [Upstream(a, served_model_name="alpha"), Upstream(b)]) as (base_url, server):
        client = _client(base_url)
        listed = [m.id for m in client.models.list().data]
        assert listed[:2] == ["tiny", "alpha"]
        for model, upstream, other in (("alpha", alpha, own), ("tiny", own, alpha)):
            before = len(other.state.bodies)
            chat = client.chat.completions.create(model=model, messages=USER, max_tokens=10)
            text = client.completions.create(model=model, prompt="2+2=", max_tokens=10)
            message = anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0).messages.create(
                model=model, max_tokens=10, messages=USER)
            assert len(upstream.state.bodies) >= 3 and len(other.state.bodies) == before
            assert chat.model == text.model == model
            db = sqlite3.connect(tmp_path / "ledger.sqlite")
            models = {r[0]: r[1] for r in db.execute("SELECT request_id, model FROM usage")}
            db.close()
            assert models[chat.id] == models[text.id + "-0"] == models[message.id] == model
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gamma", messages=USER, max_tokens=10)
