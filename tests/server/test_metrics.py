"""GET /metrics: Prometheus text, per-app registry; counters and histograms move with real requests."""

from __future__ import annotations

import random
import string

import httpx
from prometheus_client.parser import text_string_to_metric_families

from openr2.server.metrics import Metrics
from tests.server.test_app import _client


def _scrape(base_url) -> dict:
    """{(sample name, frozenset of labels): value}."""
    r = httpx.get(base_url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _get(samples, name, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _sum(samples, name) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_metrics_move_with_chat_requests(live):
    base_url, _ = live
    before = _scrape(base_url)
    client = _client(base_url)
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Count: 1 2 3"}], max_tokens=6,
                  temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    list(client.chat.completions.create(stream=True, **kwargs))
    after = _scrape(base_url)

    route = dict(route="/v1/chat/completions", method="POST", status="200")
    assert _get(after, "openr2_requests_total", **route) - _get(before, "openr2_requests_total", **route) == 2
    ep = dict(endpoint="/v1/chat/completions")
    moved = {n: _get(after, n, **ep) - _get(before, n, **ep)
             for n in ("openr2_prompt_tokens_total", "openr2_completion_tokens_total",
                       "openr2_cached_prompt_tokens_total")}
    assert moved["openr2_prompt_tokens_total"] == 2 * whole.usage.prompt_tokens
    assert moved["openr2_completion_tokens_total"] == 2 * whole.usage.completion_tokens == 12
    assert moved["openr2_cached_prompt_tokens_total"] >= 0  # the second run may hit the prefix cache
    # one TTFT per request, one ITL per token after the first, one e2e per request
    assert _get(after, "openr2_time_to_first_token_seconds_count") - \
        _get(before, "openr2_time_to_first_token_seconds_count") == 2
    assert _get(after, "openr2_inter_token_latency_seconds_count") - \
        _get(before, "openr2_inter_token_latency_seconds_count") == 2 * 5
    assert _get(after, "openr2_e2e_request_latency_seconds_count") - \
        _get(before, "openr2_e2e_request_latency_seconds_count") == 2
    assert _get(after, "openr2_time_to_first_token_seconds_sum") > _get(before, "openr2_time_to_first_token_seconds_sum")
    assert _get(after, "openr2_num_requests_running") == 0 and _get(after, "openr2_num_requests_waiting") == 0


def test_cache_hits_are_counted(live):
    base_url, _ = live
    client = _client(base_url)
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Cache me please. " * 12}], max_tokens=1,
                  temperature=0)
    client.chat.completions.create(**kwargs)
    before = _scrape(base_url)
    again = client.chat.completions.create(**kwargs)
    after = _scrape(base_url)
    name, ep = "openr2_cached_prompt_tokens_total", dict(endpoint="/v1/chat/completions")
    assert again.usage.prompt_cache_hit_tokens > 0
    assert _get(after, name, **ep) - _get(before, name, **ep) == again.usage.prompt_cache_hit_tokens


def test_completions_and_errors_by_status(live):
    base_url, _ = live
    before = _scrape(base_url)
    _client(base_url).completions.create(model="tiny", prompt="The answer is", max_tokens=3, temperature=0)
    assert httpx.get(base_url + "/v1/nowhere/at/all").status_code == 404
    assert httpx.post(base_url + "/v1/chat/completions",
                      json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}).status_code == 404
    assert httpx.post(base_url + "/v1/chat/completions", content=b"{").status_code == 400
    after = _scrape(base_url)

    def moved(**labels):
        return _get(after, "openr2_requests_total", **labels) - _get(before, "openr2_requests_total", **labels)

    assert moved(route="/v1/completions", method="POST", status="200") == 1
    assert moved(route="other", method="GET", status="404") == 1  # unknown paths share one label
    assert moved(route="/v1/chat/completions", method="POST", status="404") == 1
    assert moved(route="/v1/chat/completions", method="POST", status="400") == 1
    assert _get(after, "openr2_completion_tokens_total", endpoint="/v1/completions") - \
        _get(before, "openr2_completion_tokens_total", endpoint="/v1/completions") >= 1


def test_metrics_need_no_key_and_registries_are_per_app(live):
    base_url, server = live
    key_id, _ = server.ledger.create_key("metrics-test")
    try:
        assert httpx.get(base_url + "/v1/models").status_code == 401
        assert httpx.get(base_url + "/metrics").status_code == 200
    finally:
        server.ledger.revoke_key(key_id)
    a, b = Metrics(), Metrics()  # two registries in one process: no "Duplicated timeseries" error
    a.completion_tokens.labels("x").inc(3)
    assert b"openr2_completion_tokens_total" in b.exposition()[0]
    assert 'openr2_completion_tokens_total{endpoint="x"} 3.0' in a.exposition()[0].decode()
    assert "openr2_completion_tokens_total{endpoint=\"x\"}" not in b.exposition()[0].decode()


def test_made_up_methods_and_paths_add_no_series(live):
    """Label values are bounded: a made-up method counts as method="other", an unknown path as
    route="other", a routed path by its template; so 200 random requests leave /metrics the same size
    (give or take the digits of the counts)."""
    base_url, _ = live
    rng = random.Random(0)

    def noise(client):
        word = "".join(rng.choices(string.ascii_uppercase, k=8))
        method = rng.choice([word, "PROPFIND", "GET", "POST"])
        path = rng.choice([f"/{word.lower()}", f"/v1/{word.lower()}/x", f"/v1/files/file-{word}", "/v1/models"])
        assert client.request(method, path).status_code < 500

    with httpx.Client(base_url=base_url, timeout=30) as client:
        for _ in range(40):  # every (route, method, status) this noise can make exists after these
            noise(client)
        client.get("/metrics")  # and the scrape's own series
        before = client.get("/metrics").text
        for _ in range(200):
            noise(client)
    after = httpx.get(base_url + "/metrics").text

    def series(text):
        return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith("openr2_requests_total")}

    assert series(after) == series(before)
    assert len(after) - len(before) < 200
    samples = _scrape(base_url)
    assert _get(samples, "openr2_requests_total", route="other", method="other", status="404") > 0
    assert _get(samples, "openr2_requests_total", route="/v1/models", method="other", status="405") > 0
    assert httpx.get(base_url + "/v1/models").status_code == 200


def test_speculative_decoding_counters_are_read_from_the_engine():
    from types import SimpleNamespace

    from openr2.engine.speculative import SpecStats

    stats = SpecStats(num_drafts=4, num_draft_tokens=9, num_accepted_tokens=7)
    metrics = Metrics(SimpleNamespace(engine=SimpleNamespace(num_running=1, num_waiting=0, spec_stats=stats)))
    text = metrics.exposition()[0].decode()
    assert "openr2_spec_decode_num_drafts_total 4.0" in text
    assert "openr2_spec_decode_num_draft_tokens_total 9.0" in text
    assert "openr2_spec_decode_num_accepted_tokens_total 7.0" in text
    stats.num_accepted_tokens += 2  # read at each scrape
    assert "openr2_spec_decode_num_accepted_tokens_total 9.0" in metrics.exposition()[0].decode()
