"""Upstreams of the gateway: their configuration, which one takes a request, and which are healthy.

Owns `Upstream` (one OpenAI-compatible server: openr2, vLLM, SGLang, llama.cpp), reading them from
`--upstream URL` flags or a TOML file's `[[upstreams]]` tables, and `UpstreamPool`: the choice of an
upstream for a request and the health of each. It does not speak the completions protocol (gateway.py).

Models: each upstream serves one model name at the gateway, its `served_model_name` or (unset) the gateway's
own; a request goes only to upstreams of the model it names, so one gateway serves several models, all
rendered and tokenised with the gateway's one checkpoint tokenizer and chat template (a family of
fine-tunes or quantisations of one base, say; models with other tokenizers need a gateway each).

Choice: least outstanding requests per unit of weight, with prefix affinity. A prompt of at least
`affinity_tokens` tokens hashes its first `affinity_tokens` tokens to a preferred upstream (weighted
rendezvous hashing, so that adding or losing an upstream moves only its share of prefixes), and goes there
unless that upstream has `affinity_slack` more outstanding requests per weight than the least loaded:
requests sharing a system prompt land where their prefix is cached, and a hot prefix still spills over.

Health: a request that cannot reach an upstream (or gets a 5xx before any token) takes it out at once;
every `probe_interval_s` each upstream is probed (GET /health, or /v1/models where /health is missing) and
put back, or taken out, by the answer. The first successful probe also learns the upstream's model name and
context length from /v1/models when the configuration does not give them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx

from openr2 import billing

logger = logging.getLogger("openr2.gateway")


@dataclass
class Upstream:
    url: str  # base URL, without /v1
    model: str | None = None  # the model's name on that server (None: the first of its /v1/models)
    weight: float = 1.0
    api_key: str | None = None
    prices: billing.PriceTable | None = None  # what its tokens cost (None: the server's price table)
    # send each request's API key as `cache_salt` (hashed; vLLM's field, openr2 takes it too): the upstream
    # then shares prefix-cache blocks only within one key, as the local engine does; off for servers without it
    cache_salt: bool = False
    # the model name clients ask the gateway for to reach this upstream; None: the gateway's own
    # (--served-model-name and its aliases). Several names make one gateway serve several models
    served_model_name: str | None = None
    # send prompts as token ids (openr2, vLLM, SGLang, llama.cpp's llama-server); false for servers that take
    # text only (llama-cpp-python's): the prompt's text then, its leading BOS left to the server to add
    token_ids: bool = True

    def __post_init__(self):
        parsed = urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"upstream url must be http(s)://host[:port], got {self.url!r}")
        self.url = self.url.rstrip("/")
        if self.url.endswith("/v1"):  # accept the OpenAI base URL form too
            self.url = self.url[:-3]
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not math.isfinite(self.weight) or self.weight <= 0:
            raise ValueError(f"upstream {self.url}: weight must be a positive number, got {self.weight!r}")
        for name in ("cache_salt", "token_ids"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"upstream {self.url}: {name} must be true or false, got {getattr(self, name)!r}")
        for name in ("model", "api_key", "served_model_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"upstream {self.url}: {name} must be a non-empty string, got {value!r}")


_UPSTREAM_KEYS = {"url", "model", "models", "weight", "api_key", "prices", "cache_salt", "served_model_name",
                  "token_ids"}


def load_upstreams(path: str | os.PathLike) -> tuple[list[Upstream], dict]:
    """A gateway TOML file -> (upstreams, its other top-level keys). Each `[[upstreams]]` table has `url`,
    optional `model` (or `models`, its first entry), `weight`, `api_key`, `prices` (a table of
    billing.PriceTable's file keys, or the path of a price file, relative to this file), `cache_salt`,
    `served_model_name` (the name clients ask for; default: the gateway's own) and `token_ids` (false: send
    prompts as text)."""
    import tomllib  # Python 3.11+, imported where used as billing.py does

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"gateway config not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot parse: {e}") from None
    tables = data.pop("upstreams", None)
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"{path}: needs at least one [[upstreams]] table")
    upstreams = []
    for i, table in enumerate(tables):
        where = f"{path}: upstreams[{i}]"
        unknown = set(table) - _UPSTREAM_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(_UPSTREAM_KEYS)})")
        if "url" not in table:
            raise ValueError(f"{where}: url is required")
        model = table.get("model")
        models = table.get("models")
        if model is None and models is not None:
            if not isinstance(models, list) or not models:
                raise ValueError(f"{where}: models must be a non-empty list of names")
            model = models[0]
        prices = table.get("prices")
        if isinstance(prices, dict):
            prices = billing.PriceTable.from_dict(prices, source=f"{where}.prices")
        elif isinstance(prices, str):
            prices = billing.PriceTable.load(os.path.join(os.path.dirname(path), prices))
        elif prices is not None:
            raise ValueError(f"{where}: prices must be a table or a file path")
        try:
            upstreams.append(Upstream(table["url"], model, table.get("weight", 1.0), table.get("api_key"), prices,
                                      table.get("cache_salt", False), table.get("served_model_name"),
                                      table.get("token_ids", True)))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return upstreams, data


def check_prices(upstreams: list[Upstream], ceiling: billing.PriceTable) -> None:
    """Refuse an upstream price above the server's own table: prepaid balances reserve each request's worst
    case at the server's prices before it is known which upstream runs it, so a dearer upstream could debit
    more than was reserved and overdraw a balance. Cheaper upstreams are fine."""
    for u in upstreams:
        if u.prices is None:
            continue
        for name in ("input_miss_micro_usd_per_mtok", "input_hit_micro_usd_per_mtok", "output_micro_usd_per_mtok"):
            if getattr(u.prices, name) > getattr(ceiling, name):
                raise ValueError(f"upstream {u.url}: prices.{name} ({getattr(u.prices, name)}) is above the "
                                 f"server's ({getattr(ceiling, name)}); raise --prices to at least the dearest "
                                 f"upstream's (reservations are made at the server's prices)")
        if u.prices.batch_discount_percent < ceiling.batch_discount_percent:
            raise ValueError(f"upstream {u.url}: prices.batch_discount_percent ({u.prices.batch_discount_percent}) "
                             f"is below the server's ({ceiling.batch_discount_percent})")


@dataclass(eq=False)
class UpstreamState:
    """One upstream as the pool sees it now."""

    upstream: Upstream
    healthy: bool = True
    outstanding: int = 0  # requests sent and not yet ended
    model: str | None = None  # learnt from /v1/models when not configured
    max_model_len: int | None = None
    last_error: str | None = None
    served: int = 0  # requests sent to it, retries included

    def __post_init__(self):
        self.model = self.model or self.upstream.model

    @property
    def load(self) -> float:
        return self.outstanding / self.upstream.weight

    def headers(self) -> dict[str, str]:
        key = self.upstream.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}


class UpstreamPool:
    def __init__(self, upstreams: list[Upstream], *, affinity_tokens: int = 64, affinity_slack: float = 4.0,
                 probe_interval_s: float = 2.0, probe_timeout_s: float = 2.0):
        if not upstreams:
            raise ValueError("the gateway needs at least one upstream")
        if isinstance(affinity_tokens, bool) or not isinstance(affinity_tokens, int) or affinity_tokens < 0:
            raise ValueError(f"affinity_tokens must be an integer >= 0 (0: no affinity), got {affinity_tokens!r}")
        for name, value in (("affinity_slack", affinity_slack), ("probe_interval_s", probe_interval_s),
                            ("probe_timeout_s", probe_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.states = [UpstreamState(u) for u in upstreams]
        self.affinity_tokens, self.affinity_slack = affinity_tokens, affinity_slack
        self.probe_interval_s, self.probe_timeout_s = probe_interval_s, probe_timeout_s
        self._ties = 0  # rotates among equally loaded upstreams

    @property
    def served_model_names(self) -> list[str]:
        """The model names upstreams are configured to serve besides the gateway's own, in config order."""
        return list(dict.fromkeys(s.upstream.served_model_name for s in self.states
                                  if s.upstream.served_model_name is not None))

    # ------------------------------------------------------------------------------------- choice
    def pick(self, prompt_ids: list[int], exclude=(), served: str | None = None) -> UpstreamState | None:
        """The upstream for a request for model `served` (None: the gateway's own; see the module docstring),
        None when no healthy one serving it is left."""
        candidates = [s for s in self.states if s.healthy and s not in exclude and s.model
                      and s.upstream.served_model_name == served]
        if not candidates:
            return None
        least = min(s.load for s in candidates)
        if len(prompt_ids) >= self.affinity_tokens > 0:
            preferred = max(candidates, key=lambda s: self._score(prompt_ids, s))
            if preferred.load <= least + self.affinity_slack:
                return preferred
        tied = [s for s in candidates if s.load == least]
        self._ties += 1
        return tied[self._ties % len(tied)]

    def _score(self, prompt_ids: list[int], state: UpstreamState) -> float:
        """Weighted rendezvous hash of (prefix, upstream): -weight / ln(u), u uniform in (0, 1)."""
        prefix = ",".join(map(str, prompt_ids[:self.affinity_tokens]))
        digest = hashlib.blake2b(f"{prefix}|{state.upstream.url}".encode(), digest_size=8).digest()
        u = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)
        return -state.upstream.weight / math.log(u)

    # ------------------------------------------------------------------------------------- health
    def mark_failed(self, state: UpstreamState, reason: str) -> None:
        if state.healthy:
            logger.warning("upstream %s taken out: %s", state.upstream.url, reason)
        state.healthy, state.last_error = False, reason

    async def probe(self, client: httpx.AsyncClient, state: UpstreamState) -> bool:
        """Ask one upstream whether it serves; update its health (and learn its model); True if healthy."""
        url, headers = state.upstream.url, state.headers()
        try:
            if state.model is None or state.max_model_len is None:
                await self._learn_model(client, state)
            resp = await client.get(f"{url}/health", headers=headers, timeout=self.probe_timeout_s)
            if resp.status_code == 404:  # servers without /health (llama-cpp-python's): its model list
                resp = await client.get(f"{url}/v1/models", headers=headers, timeout=self.probe_timeout_s)
            ok = resp.status_code == 200 and state.model is not None
            reason = f"health check answered {resp.status_code}" if resp.status_code != 200 else "no model"
        except Exception as e:  # whatever an upstream answers (or not), the probing goes on
            ok, reason = False, f"health check failed: {type(e).__name__}: {e}"
        if ok and not state.healthy:
            logger.warning("upstream %s back in", url)
        if ok:
            state.healthy, state.last_error = True, None
        else:
            self.mark_failed(state, reason)
        return ok

    async def _learn_model(self, client: httpx.AsyncClient, state: UpstreamState) -> None:
        resp = await client.get(f"{state.upstream.url}/v1/models", headers=state.headers(),
                                timeout=self.probe_timeout_s)
        if resp.status_code != 200:
            return
        data = resp.json().get("data") or []
        entries = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        chosen = next((m for m in entries if m["id"] == state.model), entries[0] if entries else None)
        if chosen is None:
            return
        state.model = state.model or chosen["id"]
        length = chosen.get("max_model_len") or (chosen.get("meta") or {}).get("n_ctx_train")
        if isinstance(length, int) and length > 0:
            state.max_model_len = length

    async def probe_all(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self.probe(client, s) for s in self.states))

    async def run(self, client: httpx.AsyncClient) -> None:
        """Probe every upstream every probe_interval_s, forever (cancel to stop)."""
        while True:
            started = time.monotonic()
            await self.probe_all(client)
            await asyncio.sleep(max(0.0, self.probe_interval_s - (time.monotonic() - started)))
