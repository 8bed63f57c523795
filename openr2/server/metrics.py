"""Prometheus metrics for the server: `GET /metrics` in the text exposition format.

Owns one `Metrics` object per app, holding its own `CollectorRegistry` (never prometheus_client's global
one, so several apps in one process, as in the tests, do not clash), the ASGI middleware that counts
every HTTP request by route template, method and status, and `TokenTimer`, which turns the stream of
engine outputs of one request into time-to-first-token and inter-token-latency observations. It does not
decide what a request costs (openr2/billing.py) nor touch the engine beyond reading queue lengths.

Series (prefix `openr2_`):
  requests_total{route,method,status}         every HTTP request; unknown paths count as route="other" and
                                              methods outside HTTP's standard ones as method="other"
  prompt_tokens_total{endpoint}, cached_prompt_tokens_total{endpoint}, completion_tokens_total{endpoint}
                                              from the engine's usage counts when a request ends (billed
                                              or aborted), batch lines included (endpoint="batch:...")
  time_to_first_token_seconds                 request start (the handler entered) -> first generated token
  inter_token_latency_seconds                 between later outputs that carried new tokens, per token
  e2e_request_latency_seconds                 request start -> last output
  num_requests_running, num_requests_waiting  the scheduler's queues, read at scrape time
  spec_decode_num_drafts_total, spec_decode_num_draft_tokens_total, spec_decode_num_accepted_tokens_total
                                              speculative decoding (vLLM's series): rows that carried drafts,
                                              drafted tokens, accepted tokens; read at scrape time
  policy_refusals_total{rule,on}              only with `serve --policy` (registered by policy.py): refusals
                                              per operator rule, on="request" or "answer"; judge calls' tokens
                                              are the token counters' endpoint="policy:judge"

Gauges are read without the AsyncEngine's lock: `len()` of a deque or list is atomic under the GIL, and a
scrape must never wait behind an engine step. /metrics needs no API key, like vLLM's and /health: it
carries counts and timings only, never a key, prompt or completion (bind the server to a trusted
interface, or put it behind a proxy, if the counts themselves are sensitive).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

PREFIX = "openr2"
# Label values come from the client; each distinct one is a series kept for the life of the process, so a
# made-up method or path must not add one (a client could grow /metrics, and the memory, without bound).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                     2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class _QueueCollector:
    """The engine's queue lengths and speculative decoding counters, read when scraped."""

    def __init__(self, server):
        self.server = server

    def collect(self):
        running = GaugeMetricFamily(f"{PREFIX}_num_requests_running", "Requests in the engine's running batch.")
        waiting = GaugeMetricFamily(f"{PREFIX}_num_requests_waiting", "Requests queued for the engine.")
        engine = getattr(self.server, "engine", None)  # none in a Metrics made without a server
        running.add_metric([], getattr(engine, "num_running", 0))
        waiting.add_metric([], getattr(engine, "num_waiting", 0))
        yield running
        yield waiting
        stats = getattr(engine, "spec_stats", None)
        for name, what in (("num_drafts", "Rows that carried draft tokens into a step."),
                           ("num_draft_tokens", "Draft tokens proposed."),
                           ("num_accepted_tokens", "Draft tokens accepted.")):
            counter = CounterMetricFamily(f"{PREFIX}_spec_decode_{name}", what)
            counter.add_metric([], getattr(stats, name, 0))
            yield counter

    def describe(self):  # no scrape at registration time
        return []


class Metrics:
    def __init__(self, server=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by route template, method and status.",
                                ["route", "method", "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", ["endpoint"],
                                     registry=r)
        self.cached_prompt_tokens = Counter(f"{PREFIX}_cached_prompt_tokens",
                                            "Prompt tokens served from the prefix cache.", ["endpoint"],
                                            registry=r)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "Completion tokens generated.",
                                         ["endpoint"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "Time from the request's start to its first generated token.",
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds",
                             "Time between generated tokens after the first.", buckets=LATENCY_BUCKETS_S,
                             registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds",
                             "Time from the request's start to its last output.", buckets=E2E_BUCKETS_S,
                             registry=r)
        if server is not None:
            r.register(_QueueCollector(server))
            if hasattr(getattr(server, "engine", None), "collect"):  # a gateway's upstreams (gateway.py)
                r.register(server.engine)

    def count_usage(self, endpoint: str, usage) -> None:
        """`usage`: anything with prompt_tokens, cached_prompt_tokens, completion_tokens (engine or billing)."""
        self.prompt_tokens.labels(endpoint).inc(usage.prompt_tokens)
        self.cached_prompt_tokens.labels(endpoint).inc(usage.cached_prompt_tokens)
        self.completion_tokens.labels(endpoint).inc(usage.completion_tokens)

    def timer(self, start: float | None = None) -> TokenTimer:
        return TokenTimer(self, start)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class TokenTimer:
    """Feed it every engine output of one request; it observes TTFT once and ITL per later new token."""

    def __init__(self, metrics: Metrics, start: float | None = None):
        self.metrics = metrics
        self.start = time.perf_counter() if start is None else start
        self.tokens = 0
        self.last: float | None = None
        self.done = False

    def feed(self, output) -> None:
        now = time.perf_counter()
        tokens = output.usage.completion_tokens
        if tokens > self.tokens:
            if self.last is None:
                self.metrics.ttft.observe(now - self.start)
            else:
                per_token = (now - self.last) / (tokens - self.tokens)
                for _ in range(min(tokens - self.tokens, 64)):  # one observation per token, bounded per step
                    self.metrics.itl.observe(per_token)
            self.tokens, self.last = tokens, now
        if output.finished:
            self.finish()

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.metrics.e2e.observe(time.perf_counter() - self.start)


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware, which buffers streams): counts each HTTP request once it answers."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start" and status is None:
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            if status is None:
                status = 500  # the outer error middleware answers 500
            raise
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "other"  # unmatched paths share one label
            method = scope.get("method", "")
            self.metrics.requests.labels(template, method if method in METHODS else "other", str(status or 0)).inc()
