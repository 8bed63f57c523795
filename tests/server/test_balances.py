"""Prepaid balances through HTTP: DeepSeek's GET /user/balance, exact debits for every kind of request, a 402 with
OpenAI's error JSON when the worst case cannot be paid, two requests racing for the last of a balance, batch
lines at half price, and keys without a balance untouched.

A balance of exactly one request's worst case (billing.PriceTable.worst_case) makes the races deterministic:
whichever request goes first, the other cannot reserve (the first's reservation holds all of it, and once it
settles the cost it leaves less than a worst case, since a prompt is never free)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from openr2.engine.usage import Usage
from tests.server._live import serve_tiny

USD = 10**12
MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with serve_tiny(tmp_path_factory) as running:  # default_max_tokens=16
        yield running


def _client(base_url, key, **kw):
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, _strict_response_validation=True, **kw)


def _key(server, balance_pico_usd=None):
    key_id, secret = server.ledger.create_key("test")
    if balance_pico_usd is not None:
        server.ledger.set_balance(key_id, balance_pico_usd)
    return key_id, secret


def _cost(server, usage) -> int:
    return server.prices.cost(Usage(usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens,
                                    usage.completion_tokens))


def _balance(server, key_id) -> dict:
    return server.ledger.balance(key_id)


def test_balance_route_in_deepseeks_shape(live):
    base_url, server = live
    key_id, secret = _key(server, 5 * USD)
    auth = {"authorization": f"Bearer {secret}"}
    body = httpx.get(base_url + "/user/balance", headers=auth).json()  # DeepSeek's path, no /v1
    assert body == {"is_available": True, "balance_infos": [{"currency": "USD", "total_balance": "5.00",
                                                            "granted_balance": "0.00", "topped_up_balance": "5.00"}]}
    assert httpx.get(base_url + "/v1/user/balance", headers=auth).json() == body
    server.ledger.set_balance(key_id, 0)
    assert httpx.get(base_url + "/user/balance", headers=auth).json()["is_available"] is False
    _, free = _key(server)  # without a balance: never refused for money
    assert httpx.get(base_url + "/user/balance", headers={"authorization": f"Bearer {free}"}).json() == {
        "is_available": True, "balance_infos": []}
    assert httpx.get(base_url + "/user/balance").status_code == 401


def test_every_kind_of_request_is_debited_exactly(live):
    base_url, server = live
    key_id, secret = _key(server, USD)
    client = _client(base_url + "/v1", secret)
    expected = USD
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5)
    expected -= _cost(server, chat.usage)
    assert _balance(server, key_id) == {"balance_pico_usd": expected, "reserved_pico_usd": 0,
                                        "available_pico_usd": expected}
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}))
    expected -= _cost(server, chunks[-1].usage)
    both = client.completions.create(model="tiny", prompt=["The answer is", "What is"], max_tokens=3)
    expected -= _cost(server, both.usage)  # two prompts, two bills, two settled reservations
    lenient = openai.OpenAI(base_url=base_url + "/v1", api_key=secret, max_retries=0)
    chunks = list(lenient.completions.create(model="tiny", prompt="The answer is", max_tokens=3, stream=True,
                                             stream_options={"include_usage": True}))
    expected -= _cost(server, chunks[-1].usage)
    with pytest.raises(openai.BadRequestError):  # refused after the reservation: released, nothing debited
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, extra_body={"top_k": -5})
    assert _balance(server, key_id) == {"balance_pico_usd": expected, "reserved_pico_usd": 0,
                                        "available_pico_usd": expected}
    report = httpx.get(base_url + "/v1/usage", headers={"authorization": f"Bearer {secret}"}).json()["data"][0]
    assert report["cost_pico_usd"] == USD - expected  # the ledger's usage rows and the debits agree


def test_402_when_the_worst_case_cannot_be_paid(live):
    base_url, server = live
    _, free = _key(server)
    prompt_tokens = _client(base_url, free).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=1).usage.prompt_tokens
    worst = server.prices.worst_case(prompt_tokens, 4)
    key_id, secret = _key(server, worst - 1)
    client = _client(base_url, secret)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    assert err.value.status_code == 402 and err.value.code == "insufficient_balance"
    assert set(err.value.body) == {"message", "type", "param", "code"} and "Insufficient balance" in err.value.message
    r = httpx.post(base_url + "/v1/completions", headers={"authorization": f"Bearer {secret}"},
                   json={"model": "tiny", "prompt": "x" * 50, "max_tokens": 4})
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_balance"
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3).usage  # a smaller cap fits
    assert 0 < _balance(server, key_id)["balance_pico_usd"] < worst - 1


def test_two_requests_race_for_the_last_of_a_balance(live):
    base_url, server = live
    _, free = _key(server)
    prompt_tokens = _client(base_url, free).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=1).usage.prompt_tokens
    worst = server.prices.worst_case(prompt_tokens, 6)

    def go(stream, secret, start, results):
        start.wait()
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "stream": stream,
                "stream_options": {"include_usage": True} if stream else None}
        results.append(httpx.post(base_url + "/v1/chat/completions", json=body, timeout=60,
                                  headers={"authorization": f"Bearer {secret}"}))

    for stream in (False, True):
        key_id, secret = _key(server, worst)
        results, start = [], threading.Barrier(2)
        threads = [threading.Thread(target=go, args=(stream, secret, start, results)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r.status_code for r in results) == [200, 402]
        won = next(r for r in results if r.status_code == 200)
        usage = won.json()["usage"] if not stream else json.loads(won.text.split("data: ")[-2])["usage"]
        cost = server.prices.cost(Usage(usage["prompt_tokens"], usage["prompt_cache_hit_tokens"],
                                        usage["completion_tokens"]))
        assert _balance(server, key_id) == {"balance_pico_usd": worst - cost, "reserved_pico_usd": 0,
                                            "available_pico_usd": worst - cost}


def test_batch_lines_reserve_at_half_price_and_fail_alone_with_402(live):
    base_url, server = live
    _, free = _key(server)
    prompt_tokens = _client(base_url, free).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=1).usage.prompt_tokens
    worst = server.prices.worst_case(prompt_tokens, 4, batch=True)
    assert 2 * worst == server.prices.worst_case(prompt_tokens, 4)
    key_id, secret = _key(server, worst)  # one line's worst case at the batch price, not two
    client = _client(base_url + "/v1", secret)
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "tiny", "messages": MESSAGES, "max_tokens": 4}}) for i in range(3)]
    upload = client.files.create(file=("batch.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.time() + 60
    while (batch := client.batches.retrieve(batch.id)).status != "completed" and time.time() < deadline:
        time.sleep(0.1)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 2)
    out = json.loads(client.files.content(batch.output_file_id).content)
    errors = [json.loads(line) for line in client.files.content(batch.error_file_id).content.splitlines()]
    assert {e["response"]["status_code"] for e in errors} == {402}
    assert {e["response"]["body"]["error"]["code"] for e in errors} == {"insufficient_balance"}
    u = out["response"]["body"]["usage"]
    cost = server.prices.cost(Usage(u["prompt_tokens"], u["prompt_cache_hit_tokens"], u["completion_tokens"]),
                              batch=True)
    assert _balance(server, key_id) == {"balance_pico_usd": worst - cost, "reserved_pico_usd": 0,
                                        "available_pico_usd": worst - cost}
