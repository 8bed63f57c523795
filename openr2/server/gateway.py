"""UpstreamBackend: the server's generation backend when the tokens come from other servers.

The routes talk to a generation backend: `generate(prompt, params, request_id, salt, priority)` yielding
engine-shaped outputs (`RequestOutput`), plus `tokenizer`, `max_model_len`, `failure`, `num_running` and
`num_waiting`. AsyncEngine is the in-process one; this is the other. So keys, rate limits, balances, the
ledger, batches, metrics, the chat page, the reasoning split and tool calls are the same code either way:
the gateway renders and tokenises the prompt itself (the checkpoint's own chat template) and sends the ids
to an upstream's /v1/completions, which openr2, vLLM, SGLang and llama.cpp's llama-server all accept (an
upstream configured `token_ids = false`, llama-cpp-python's server, gets the ids' text), streaming, with
`stream_options.include_usage`. Each upstream chunk becomes one output at once (no buffering); `<think>`
returned inline is split by the routes as for the local engine. An upstream configured with `cache_salt`
gets each request's key, hashed, as `cache_salt` (vLLM's field; openr2 takes it too), so its prefix cache is
shared within a key only; otherwise every key shares the upstream's cache.

Failures: a request whose upstream cannot be reached, drops the connection, answers 5xx/429 or sends an error
event before any token was passed on goes to another upstream, each tried once; a 4xx is the request's own
fault and is answered as is. Only a transport failure takes an upstream out at once (upstreams.py): a 5xx
or an error event may be this request's doing, and one bad request must not empty the pool; the health
probes take out an upstream that is really down. A request that fails after tokens went out ends with
UpstreamFailed (a 502; a stream ends with its error event) unless it is restartable (see generate), and
the last output yielded is updated to the usage of what was delivered, counted with the tokenizer: the
routes bill the last output they received. A client that goes away is billed the same way.

Usage: the upstream's counts where it reports them (upstream_usage.py), the tokenizer's where it does not;
cached prompt tokens only from the upstream. The last output carries `usage_source` ("upstream" or "local",
counted on /metrics), every output the chosen upstream's price table (`prices`, None for the server's).

Logprobs: asked of the upstream in the completions API's form with `return_tokens_as_token_ids` (vLLM's; openr2
takes it), so tokens come back as ids; an upstream that names them by text instead (llama.cpp) has them mapped
back through a table of each id's text (then alternatives that read the same are one entry, as that upstream
sent them). The routes show them as they show the local engine's. Not supported (a 400): constrained decoding,
whose grammar runs in openr2's own sampler.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import httpx
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from openr2.chat_format import ReasoningParser, prompt_opens_reasoning
from openr2.engine.engine import CompletionOutput, RequestOutput
from openr2.engine.sampling import TokenSample
from openr2.engine.usage import Usage
from openr2.server.errors import APIError
from openr2.server.metrics import PREFIX
from openr2.server.upstream_usage import merge, reported_usage
from openr2.server.upstreams import UpstreamPool, UpstreamState

logger = logging.getLogger("openr2.gateway")
_RETRY_STATUS = {429, 500, 502, 503, 504}  # the upstream's trouble, not the request's: another may serve it


class UpstreamFailed(APIError):
    """An upstream failed after part of the answer was passed on, or no upstream could take the request."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(status, message, "server_error", None, "upstream_error",
                         {"Retry-After": "1"} if status == 503 else None)


class _Retry(Exception):
    """The chosen upstream failed before any token went out: try another."""


class _ErrorEvent(Exception):
    """An upstream's stream carried an error event: the request failed there, the upstream itself is alive."""


class _BadStream(Exception):
    """An upstream's stream the gateway cannot read (a chunk that is not JSON, a choice out of range)."""


class _Dropped(Exception):
    """An upstream's stream ended before every choice finished: the upstream dropped it."""


# the upstream cannot be reached, dropped the connection or went silent: it is taken out at once
_TRANSPORT = (aiohttp.ClientError, TimeoutError, OSError, _Dropped)


def upstream_body(ids: list[int], params) -> dict:
    """The /v1/completions body for one request: vLLM's names, extensions only when they are not defaults
    (so that a server without them, llama.cpp's, is not handed fields it might refuse)."""
    if params.structured_outputs is not None:  # its grammar runs in openr2's own sampler, which is not here
        raise ValueError("response_format: constrained decoding (json_object, json_schema, strict tools, a required "
                         "or named tool_choice) is not available through the gateway yet")
    body = {"prompt": ids, "n": params.n, "temperature": params.temperature, "top_p": params.top_p,
            "stream": True, "stream_options": {"include_usage": True}}
    if params.max_tokens is not None:
        body["max_tokens"] = params.max_tokens
    if params.logprobs is not None:  # the completions API's: how many alternatives per token (0: none)
        # tokens named "token_id:<id>" where the upstream can (openr2, vLLM; others ignore it and name them by
        # text, which _Run maps back to ids: the same text, but alternatives of one text are then one entry)
        body["logprobs"], body["return_tokens_as_token_ids"] = params.logprobs, True
    optional = {"top_k": -1, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "repetition_penalty": 1.0, "seed": None, "ignore_eos": False, "skip_special_tokens": True,
                "include_stop_str_in_output": False}
    for name, default in optional.items():
        if getattr(params, name) != default:
            body[name] = getattr(params, name)
    if params.stop:
        body["stop"] = list(params.stop)
    if params.stop_token_ids:
        body["stop_token_ids"] = list(params.stop_token_ids)
    return body


class UpstreamBackend:
    def __init__(self, pool: UpstreamPool, tokenizer, max_model_len: int | None = None,
                 client: httpx.AsyncClient | None = None):
        self.pool, self.tokenizer = pool, tokenizer
        self._max_model_len = max_model_len
        self.failure: str | None = None  # never dead: upstreams come and go (a 503 while none is healthy)
        self.client = client  # the health probes' (a few requests a second at most)
        self.session: aiohttp.ClientSession | None = None  # the generations' (see start)
        self._probes: asyncio.Task | None = None
        self.usage_sources = {"upstream": 0, "local": 0}  # for /metrics
        self._token_ids: dict[str, int] | None = None  # token text -> an id with that text (logprobs)

    # ------------------------------------------------------------------------- backend interface
    @property
    def max_model_len(self) -> int:
        """The configured context length, else the smallest an upstream reported, else 4096."""
        if self._max_model_len:
            return self._max_model_len
        known = [s.max_model_len for s in self.pool.states if s.max_model_len]
        return min(known) if known else 4096

    @property
    def served_model_names(self) -> list[str]:
        """Models served besides the gateway's own (upstreams' served_model_name): /v1/models lists them."""
        return self.pool.served_model_names

    @property
    def num_running(self) -> int:
        return sum(s.outstanding for s in self.pool.states)

    num_waiting = 0  # the upstreams queue; the gateway holds nothing back

    def collect(self):
        """The upstreams on /metrics (metrics.py registers this collector): health, load, requests sent, and
        how many bills rest on the upstream's usage or on local counts (each ledger row says which too)."""
        healthy = GaugeMetricFamily(f"{PREFIX}_upstream_healthy", "1 while the upstream is in the pool.",
                                    labels=["upstream"])
        outstanding = GaugeMetricFamily(f"{PREFIX}_upstream_outstanding_requests",
                                        "Requests sent to the upstream and not yet ended.", labels=["upstream"])
        sent = CounterMetricFamily(f"{PREFIX}_upstream_requests", "Requests sent to the upstream, retries included.",
                                   labels=["upstream"])
        for state in self.pool.states:
            healthy.add_metric([state.upstream.url], int(state.healthy))
            outstanding.add_metric([state.upstream.url], state.outstanding)
            sent.add_metric([state.upstream.url], state.served)
        sources = CounterMetricFamily(f"{PREFIX}_usage_source", "Requests ended with usage reported by the "
                                      "upstream or counted with the tokenizer.", labels=["source"])
        for source in ("upstream", "local"):
            sources.add_metric([source], self.usage_sources[source])
        yield from (healthy, outstanding, sent, sources)

    def describe(self):  # no scrape at registration time
        return []

    async def start(self) -> None:
        """Open the connection pools, probe every upstream once, then keep probing in the background.

        Generations stream through aiohttp, whose keep-alive pool hands out an idle connection in O(1) and
        whose HTTP parser is C: reading 32 streams it spends ~16 us of CPU per SSE event against httpx's ~80
        (httpcore re-checks every pooled connection, a poll each, whenever a request starts or ends), and
        per streamed token that CPU is the gateway's cost (BENCHMARKS.md). The probes keep httpx."""
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.pool.probe_timeout_s))
        if self.session is None:
            # no limit on connections: every open stream holds one (keep-alive: reused once its answer was
            # read to the end); no total timeout: a long prefill may take minutes, a silent upstream 600 s
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=600.0))
        await self.pool.probe_all(self.client)
        self._probes = asyncio.create_task(self.pool.run(self.client))

    async def stop(self) -> None:
        if self._probes is not None:
            self._probes.cancel()
        if self.client is not None:
            await self.client.aclose()
        if self.session is not None:
            await self.session.close()

    async def token_ids(self) -> dict[str, int]:
        """Each token's text (the tokenizer's decode of it alone, as openr2 and vLLM name logprob tokens) ->
        its id, the lowest where several ids read the same (their text, all the routes show, is the same);
        built once, off the event loop, on the first request asking for logprobs."""
        if self._token_ids is None:
            def build() -> dict[str, int]:
                texts = self.tokenizer.backend.decode_batch([[i] for i in range(self.tokenizer.vocab_size)],
                                                            skip_special_tokens=False)
                table: dict[str, int] = {}
                for i, t in enumerate(texts):
                    table.setdefault(t, i)
                return table
            self._token_ids = await asyncio.to_thread(build)
        return self._token_ids

    def _prompt_text(self, ids: list[int]) -> str:
        """The prompt as text for a server that tokenises it itself (with the same vocabulary: a GGUF the
        exporter wrote): special tokens spelt out, which llama.cpp parses back to their ids, and the leading
        BOS left out, since such a server adds its own (sending it too would double it)."""
        bos = self.tokenizer.bos_token_id
        return self.tokenizer.decode(ids[1:] if ids and ids[0] == bos else ids)

    async def generate(self, prompt: dict, params, request_id: str | None = None, salt: str | None = None,
                       priority: int = 0, restartable: bool = False) -> AsyncIterator[RequestOutput]:
        """Yield outputs as the upstream's chunks arrive; the last is finished and carries the usage.

        A restartable request (non-streamed: the caller shows nothing before the end) that fails midway
        starts again on another upstream; only what reached a client is ever billed, and once. Batch lines
        (priority > 0) also wait for a healthy upstream instead of failing."""
        ids, text = list(prompt["prompt_token_ids"]), prompt.get("prompt")
        # the model the request named, where upstreams serve it under that name; else the gateway's own
        served = prompt.get("model") if prompt.get("model") in self.pool.served_model_names else None
        body = upstream_body(ids, params)
        token_ids = await self.token_ids() if params.logprobs is not None else None
        tried: set = set()
        last_error = None
        while True:
            state = self.pool.pick(ids, tried, served)
            if state is None:
                if priority <= 0:
                    why = f" (the last one: {last_error})" if last_error else ""
                    raise UpstreamFailed(f"No upstream could take the request{why}; try again shortly.", 503)
                await asyncio.sleep(self.pool.probe_interval_s)
                tried.clear()
                continue
            tried.add(state)
            run = _Run(self, state, ids, text, params, request_id or "", token_ids, served)
            sent = {**body, "cache_salt": _cache_salt(salt)} if state.upstream.cache_salt and salt else body
            if not state.upstream.token_ids:  # a server that takes text only: the same ids, as text
                sent = {**sent, "prompt": self._prompt_text(ids)}
            try:
                # aclosing: a consumer that stops (a client gone) closes the upstream stream now, not at GC
                async with contextlib.aclosing(run.stream(sent)) as outputs:
                    async for output in outputs:
                        yield output
                return
            except _Retry as e:
                last_error = str(e)
                logger.warning("request %s: upstream %s failed before any token (%s); trying another",
                               request_id, state.upstream.url, e)
            except UpstreamFailed as e:
                if not restartable:
                    raise
                logger.warning("request %s: upstream %s failed midway (%s); starting again elsewhere",
                               request_id, state.upstream.url, e.__cause__ or e)


def _cache_salt(key_id: str) -> str:
    """The salt that partitions an upstream's prefix cache by API key, without handing it the key's id."""
    return hashlib.blake2b(key_id.encode(), digest_size=16, person=b"openr2-salt").hexdigest()


async def _sse_events(pieces: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """The `data:` payloads of a server-sent event stream, grouped by what each network read brought: one
    event at a time while the gateway keeps up, several at once when it falls behind (then they go on to
    the client as one chunk, which is what keeps its CPU per token down under load). Nothing waits for
    more: each read is passed on as it arrives. After `[DONE]` (the last group yielded) the rest of the body
    is read, at most _DRAIN_S, without yielding: a response read to its end hands its connection back to the
    pool for the next request (keep-alive), where one closed early would cost a new connection each time."""
    buffer = b""
    async for piece in pieces:
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        events = [line[5:].strip() for line in lines if line.startswith(b"data:")]
        if b"[DONE]" in events:
            yield events[:events.index(b"[DONE]") + 1]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_DRAIN_S):
                    async for _ in pieces:
                        pass
            return
        if events:
            yield events
    if buffer.startswith(b"data:"):
        yield [buffer[5:].strip()]


_DRAIN_S = 1.0  # how long the end of a body after [DONE] is waited for before its connection is dropped


def _logprob(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadStream(f"a logprob that is not a number: {value!r:.40}")
    return float(value)


class _Run:
    """One request on one upstream: the SSE stream read, turned into outputs, and its usage."""

    def __init__(self, backend: UpstreamBackend, state: UpstreamState, ids, text, params, request_id: str,
                 token_ids: dict[str, int] | None = None, served: str | None = None):
        self.backend, self.state, self.ids, self.prompt = backend, state, ids, text
        self.served = served  # the model name the request is billed under (None: the gateway's own)
        self.params, self.request_id = params, request_id
        self.token_ids = token_ids  # logprobs asked: token text -> id (UpstreamBackend.token_ids)
        self.outputs = [CompletionOutput(index=i, logprobs=[] if token_ids is not None else None)
                        for i in range(params.n)]
        self.chunks = 0  # text-bearing choice deltas: the running completion count (one token each, mostly)
        self.token_chunks = 0  # choice deltas with text or without a finish_reason (see _usage)
        self.reported = None
        self.last: RequestOutput | None = None  # the last output yielded
        self.failure: Exception | None = None  # a bad event that came after text in the same read (_feed)

    async def stream(self, body: dict) -> AsyncIterator[RequestOutput]:
        state, pool = self.state, self.backend.pool
        state.outstanding += 1
        state.served += 1
        try:
            async with self.backend.session.post(f"{state.upstream.url}/v1/completions",
                                                 json={**body, "model": state.model},
                                                 headers=state.headers()) as resp:
                if resp.status != 200:
                    await self._refuse(resp)
                # content-decoded as it arrives; ends after [DONE], the body read (keep-alive)
                async for events in _sse_events(resp.content.iter_any()):
                    output = self._feed(events)
                    if output is not None:
                        self.last = output
                        yield output
                    if self.failure is not None:
                        raise self.failure
            if not self._all_finished:
                raise _Dropped("the stream ended before every choice finished")
        except (*_TRANSPORT, _BadStream, _ErrorEvent) as e:
            if self._all_finished:  # lost after the last choice ended (before [DONE]): the answer is whole
                pass
            elif self.last is None:
                if isinstance(e, _TRANSPORT):  # it cannot be reached or dropped the connection
                    pool.mark_failed(state, f"{type(e).__name__}: {e}")
                raise _Retry(f"{type(e).__name__}: {e}") from None
            else:
                self._settle_delivered()
                raise UpstreamFailed(f"The upstream failed mid-answer ({type(e).__name__}); the part delivered "
                                     f"is billed.") from e
        except (GeneratorExit, asyncio.CancelledError):  # the client went away: it is billed what it got
            if self.last is not None:
                self._settle_delivered()
            raise
        finally:
            state.outstanding -= 1
        yield self._final()

    async def _refuse(self, resp: aiohttp.ClientResponse) -> None:
        """A non-200 answer: a retry elsewhere for the upstream's trouble, else the client's 4xx as is."""
        raw = await resp.read()
        if resp.status in _RETRY_STATUS:  # the health probes, not this answer, take it out
            raise _Retry(f"answered {resp.status}")
        error = {}
        with contextlib.suppress(ValueError, AttributeError):
            error = json.loads(raw).get("error") or {}
        error = error if isinstance(error, dict) else {"message": str(error)}
        status = resp.status if 400 <= resp.status < 500 else 502
        message = error.get("message") or raw[:200].decode(errors="replace")
        param = error.get("param") if isinstance(error.get("param"), str) else None
        raise APIError(status, f"upstream: {message}", param=param)

    def _feed(self, events: list[bytes]) -> RequestOutput | None:
        """The events that arrived together -> one output carrying all their text, or None (no text)."""
        for o in self.outputs:
            o.text_delta, o.token_ids_delta = "", []
        changed = False
        for data in events:
            if data == b"[DONE]":
                continue
            try:
                changed |= self._apply(data)
            except (_ErrorEvent, _BadStream) as e:
                if not changed:
                    raise
                # the text before it goes out first, as it would have had it come in a read of its own
                self.failure = e
                break
        if not changed:
            return None
        return self._output(finished=False, usage=Usage(len(self.ids), 0, self.chunks, 0))

    def _apply(self, data: bytes) -> bool:
        """One upstream chunk into the choices' state; True if it added text."""
        try:
            chunk = json.loads(data)
        except ValueError:
            raise _BadStream(f"not JSON: {data[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise _BadStream("a chunk that is not an object")
        if chunk.get("error"):  # an error event in the stream (openr2, vLLM): this request failed there
            raise _ErrorEvent(f"upstream error event: {json.dumps(chunk['error'])[:200]}")
        reported = reported_usage(chunk)
        if reported is not None:
            self.reported = reported
        changed = False
        for choice in chunk.get("choices") or []:
            i = choice.get("index", 0) if isinstance(choice, dict) else None
            if not isinstance(i, int) or not 0 <= i < len(self.outputs):
                raise _BadStream(f"a choice index out of range: {i!r}")
            out, delta = self.outputs[i], choice.get("text") or ""
            if not isinstance(delta, str):
                raise _BadStream(f"a choice text that is not a string: {delta!r:.80}")
            if delta:
                out.text += delta
                out.text_delta += delta
                self.chunks += 1
                changed = True
            if self.token_ids is not None and choice.get("logprobs"):
                samples = self._samples(choice["logprobs"])
                out.logprobs += samples
                out.token_ids += (new := [s.token_id for s in samples])
                out.token_ids_delta += new
                changed |= bool(new)
            if delta or not choice.get("finish_reason"):  # a token's chunk, not a bare end-of-choice one
                self.token_chunks += 1
            if choice.get("finish_reason") and out.finish_reason is None:
                # held back until the usage has come (_final): then the last output carries it
                out.stop_reason = choice["finish_reason"]
        return changed

    def _samples(self, logprobs) -> list[TokenSample]:
        """A chunk's legacy completions logprobs (tokens, token_logprobs, top_logprobs) -> TokenSamples, the
        tokens' ids looked up by their text; at most `logprobs` alternatives each, in the upstream's order."""
        tokens, lps = (logprobs.get("tokens"), logprobs.get("token_logprobs")) if isinstance(logprobs, dict) \
            else (None, None)
        tops = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
        tops = tops if tops is not None else [None] * len(tokens or [])
        if not (isinstance(tokens, list) and isinstance(lps, list) and isinstance(tops, list)
                and len(tokens) == len(lps) == len(tops)):
            raise _BadStream(f"logprobs that are not the completions API's: {json.dumps(logprobs)[:120]}")
        samples = []
        for token, lp, top in zip(tokens, lps, tops):
            alternatives = [(self._token_id(t), _logprob(x)) for t, x in (top or {}).items()] \
                if isinstance(top, dict) or top is None else None
            if alternatives is None:
                raise _BadStream(f"top_logprobs that are not token -> logprob: {json.dumps(top)[:120]}")
            samples.append(TokenSample(self._token_id(token), None if lp is None else _logprob(lp),
                                       alternatives[:self.params.logprobs]))
        return samples

    def _token_id(self, token) -> int:
        if isinstance(token, str) and token.startswith("token_id:") and token[9:].isdigit():
            if int(token[9:]) < self.backend.tokenizer.vocab_size:
                return int(token[9:])
            raise _BadStream(f"logprobs name a token id past this tokenizer's vocabulary: {token!r:.40}")
        token_id = self.token_ids.get(token) if isinstance(token, str) else None
        if token_id is None:
            raise _BadStream(f"logprobs name a token no id of this tokenizer reads as: {token!r:.80} (is the "
                             f"upstream serving a model with this checkpoint's tokenizer?)")
        return token_id

    def _output(self, finished: bool, usage: Usage) -> RequestOutput:
        outputs = []
        for o in self.outputs:
            copy = CompletionOutput(index=o.index, text=o.text, text_delta=o.text_delta,
                                    finish_reason=o.finish_reason, logprobs=o.logprobs,
                                    token_ids_delta=o.token_ids_delta)
            if not finished:
                copy.finish_reason = None
            outputs.append(copy)
        out = RequestOutput(self.request_id, self.prompt, self.ids, outputs, finished, usage)
        out.prices = self.state.upstream.prices  # Server.prices_for bills with them
        out.model = self.served  # and Server.bill records the request under this model (None: the server's)
        out.usage_source = "local"  # counted here until the final output says otherwise (_final)
        return out

    @property
    def _all_finished(self) -> bool:
        return all(o.stop_reason is not None for o in self.outputs)

    def _final(self) -> RequestOutput:
        for o in self.outputs:
            o.text_delta, o.token_ids_delta = "", []
            o.finish_reason = "length" if o.stop_reason == "length" else "stop"
        usage, source = self._usage(self.reported)
        out = self._output(finished=True, usage=usage)
        out.usage_source = source
        self.backend.usage_sources[source] += 1
        return out

    def _usage(self, reported) -> tuple[Usage, str]:
        tokenizer = self.backend.tokenizer

        def completion() -> int:
            if self.token_ids is not None:  # logprobs name every token: counted exactly
                return sum(len(o.token_ids) for o in self.outputs)
            # the text re-tokenised, but never fewer than the token chunks (a token each at least): a sampled
            # sequence need not be the text's own tokenisation (llama-cpp-python streams a chunk per token,
            # empty while a character's bytes are incomplete, and no usage: 8 tokens of a tiny model's answer
            # re-tokenise to 4)
            return max(self.token_chunks, sum(len(tokenizer.encode(o.text)) for o in self.outputs))

        def reasoning() -> int:
            if self.prompt is None:  # a text completion: no chat, no reasoning split
                return 0
            opens = prompt_opens_reasoning(self.prompt)
            return sum(len(tokenizer.encode(ReasoningParser(opens).parse(o.text)[0] or ""))
                       for o in self.outputs)

        return merge(reported, prompt_tokens=len(self.ids), completion_tokens=completion,
                     reasoning_tokens=reasoning)

    def _settle_delivered(self) -> None:
        """Mid-answer failure: the routes bill the last output they got, so it gets the delivered usage."""
        usage, _ = self._usage(None)  # any usage the upstream sent described more than was delivered
        self.last.usage, self.last.usage_source = usage, "local"
        self.backend.usage_sources["local"] += 1
