"""The FastAPI app: OpenAI-compatible routes over the AsyncEngine, every request metered into the ledger.

Routes: GET /health, GET /metrics (metrics.py), GET /v1/models and /v1/models/{id}, POST
/v1/chat/completions and POST /v1/completions (stream and non-stream), the files and batches routes of
batches.py (whose worker runs here), GET /v1/usage and /v1/user/balance (account.py), Anthropic's
POST /v1/messages (anthropic.py) and the chat page of pages.py; DeepSeek's base URLs (no /v1,
/beta) reach the same routes through aliases.py. Bodies are size-limited while
they are read (limits.py). A request is validated (protocol.py), authorised (a key once any exists, or with
require_auth), rate limited, rendered and tokenised, then streamed from the engine; its usage is billed
from the engine's token counts, also when the client disconnects before the end, streamed or not (the
request is then aborted and its cache blocks freed). Prompt and completion text are stored only with
log_content. A stream that fails after its 200 headers ends with an error event, then `data: [DONE]`. A dead
engine (async_engine.py) turns /health and every generation into a 503.

`Server.engine` is the generation backend: the in-process AsyncEngine, or gateway.py's UpstreamBackend (the
same interface over OpenAI-compatible upstream servers: `openr2 serve --upstream`). A backend with `start`
/ `stop` is started and stopped with the app; an output's `prices`, where it has them, price its bill.
Non-streamed requests pass `restartable=True`: nothing of theirs reaches the client before the end, so a
backend may start them again elsewhere when its upstream fails midway.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from openr2 import billing
from openr2.chat_format import fim_prompt, has_fim, prompt_opens_reasoning
from openr2.engine.async_engine import AsyncEngine, EngineDeadError
from openr2.engine.sampling import DEFAULT_MAX_TOKENS
from openr2.server.aliases import PathAliasMiddleware
from openr2.server.chat_template import TemplateFeatures
from openr2.server.errors import (
    bad_request,
    install_error_handlers,
    not_found,
    parse_json_body,
    payment_required,
    rate_limited,
    stream_error_body,
    unauthorized,
    unavailable,
)
from openr2.server.ledger import InsufficientBalance, Ledger, usage_source
from openr2.server.limits import BodyLimitMiddleware
from openr2.server.metrics import Metrics, MetricsMiddleware
from openr2.server.outputs import (
    SSE_DONE,
    ChatStream,
    CompletionStream,
    chat_completion_from_output,
    completion_from_outputs,
    sse,
)
from openr2.server.policy import Policy, PolicyEngine
from openr2.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Model,
    ModelList,
    json_body_doc,
    random_id,
)

LOCAL_KEY = "local"  # the owner of everything while no API key exists


@dataclass
class ServerConfig:
    model_name: str = "openr2"
    require_auth: bool = False
    log_content: bool = False
    max_body_bytes: int = 8 << 20
    max_file_bytes: int = 200 << 20  # POST /v1/files uploads (limits.py enforces both while reading)
    # FastAPI's /docs and /redoc pages load Swagger UI and ReDoc from a CDN: off, so that no page of a
    # private server sends its users' browsers elsewhere (/openapi.json is always served)
    docs: bool = False
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    default_sampling: dict = dataclasses.field(default_factory=dict)  # from generation_config.json
    example_prompts: list = dataclasses.field(default_factory=list)  # the chat page's, from the model card
    # other names of the served model -> the thinking mode each implies (None: the model's default), as
    # DeepSeek's platform names its two modes; a request's own thinking choice still wins
    model_aliases: dict = dataclasses.field(default_factory=lambda: dict(DEEPSEEK_ALIASES))
    policy: Policy | None = None  # the operator's content rules (`--policy`, policy.py); None: no policy


DEEPSEEK_ALIASES = {"deepseek-chat": False, "deepseek-reasoner": True}
_ALIAS_MODES = {"thinking": True, "non-thinking": False, "default": None}


def parse_model_aliases(text: str) -> dict[str, bool | None]:
    """`openr2 serve --model-aliases`: "deepseek-chat=non-thinking,deepseek-reasoner=thinking" -> ServerConfig's
    model_aliases; a bare name implies the model's default mode; "" means no aliases."""
    aliases = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, mode = item.partition("=")
        if not name.strip() or mode.strip() not in ("", *_ALIAS_MODES):
            raise ValueError(f"--model-aliases: {item!r} is not NAME or NAME=thinking|non-thinking|default")
        aliases[name.strip()] = _ALIAS_MODES.get(mode.strip())
    return aliases


class Server:
    """What the routes share: the engine front, tokenizer, ledger, prices and limits."""

    def __init__(self, engine: AsyncEngine, ledger: Ledger, prices: billing.PriceTable | None = None,
                 config: ServerConfig | None = None):
        self.engine, self.ledger = engine, ledger
        self.tokenizer = engine.tokenizer
        self.prices = prices or billing.PriceTable()
        self.config = config or ServerConfig()
        self.limiter = ledger.rate_limiter(self.config.requests_per_min, self.config.tokens_per_min)
        self.created = int(time.time())
        # more models a backend serves by name (a gateway's upstreams), each at its model's default mode
        self.other_models = list(getattr(engine, "served_model_names", ()))
        self.metrics = Metrics(self)
        if self.config.policy is not None:  # every generation (chat, completions, messages, batches) passes it
            self.engine = PolicyEngine(engine, self.config.policy, self.metrics)
        self.template = TemplateFeatures(self.tokenizer, self.config.model_name, getattr(engine, "model_type", None))

    # ------------------------------------------------------------------------------------ helpers
    async def authorise(self, request: Request) -> str:
        """The verified key's id (LOCAL_KEY while no key exists), else a 401. Its reads are database round
        trips (on PostgreSQL, over the network), so they run in a worker thread, never holding up the streams
        on this loop."""
        return await asyncio.to_thread(self._authorise, request)

    def _authorise(self, request: Request) -> str:
        if not (self.config.require_auth or self.ledger.has_keys()):
            return LOCAL_KEY
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            secret = request.headers.get("x-api-key", "")  # Anthropic's clients send the key this way
        if not secret.strip():
            raise unauthorized("Missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>').",
                               "missing_api_key")
        key_id = self.ledger.verify_key(secret.strip())
        if key_id is None:
            raise unauthorized()
        return key_id

    async def body(self, request: Request) -> dict:
        return parse_json_body(await request.body())  # at most max_body_bytes: limits.py stops the read

    @property
    def model_names(self) -> list[str]:
        """The served model's name, the backend's other models, then the aliases."""
        names = [self.config.model_name, *self.other_models, *self.config.model_aliases]
        return list(dict.fromkeys(names))

    def check_model(self, name: str) -> bool | None:
        """404 unless `name` is the served model or an alias; returns the thinking mode an alias implies."""
        if name not in self.model_names:
            raise not_found(f"The model '{name}' does not exist; this server serves '{self.config.model_name}'.",
                            "model", "model_not_found")
        if name == self.config.model_name or name in self.other_models:
            return None
        return self.config.model_aliases[name]

    async def acquire(self, key_id: str, num_tokens: int) -> float:
        """The limiter's answer (limiter.acquire): at once from memory; from the database (replicas) on the
        limiter's own thread, so that its round trip never holds up the streams on this loop."""
        executor = getattr(self.limiter, "executor", None)
        if executor is None:
            return self.limiter.acquire(key_id, num_tokens)
        return await asyncio.get_running_loop().run_in_executor(executor, self.limiter.acquire, key_id, num_tokens)

    async def admit(self, key_id: str, num_tokens: int) -> None:
        try:
            wait = await self.acquire(key_id, num_tokens)
        except ValueError as e:
            raise bad_request(str(e), "max_tokens") from None
        if wait > 0:
            raise rate_limited(wait)

    async def reserve(self, key_id: str, amounts: dict[str, int]) -> list[str]:
        """Reserve each request id's worst-case cost on the key's prepaid balance (balance_store.py): the ids
        reserved, none for a key without a balance; a 402 when the balance cannot cover them."""
        if key_id == LOCAL_KEY:  # no keys at all: nobody has a balance, not even a read to make
            return []
        try:
            return list(amounts) if await asyncio.to_thread(self.ledger.reserve, key_id, amounts) else []
        except InsufficientBalance as e:
            raise payment_required(str(e)) from None

    async def release(self, reserved: list[str]) -> None:
        """Drop what is left of reservations once their requests ended (billing settled the rest)."""
        if reserved:
            await asyncio.shield(asyncio.to_thread(self.ledger.release, reserved))

    async def released_after(self, reserved: list[str], work):
        """Await `work` (a request run to its end), then release what its bills left reserved."""
        try:
            return await work
        finally:
            await self.release(reserved)

    def prices_for(self, output) -> billing.PriceTable:
        """The price table of one output: the upstream's own where the gateway's config gives one."""
        return getattr(output, "prices", None) or self.prices

    def bill(self, key_id: str, endpoint: str, output, request_id: str, content: str | None = None) -> None:
        self.metrics.count_usage(endpoint, output.usage)
        usage = output.usage
        cost = self.prices_for(output).cost(usage, batch=False)
        model = getattr(output, "model", None) or self.config.model_name  # a gateway's other models
        self.ledger.record_usage(key_id, model, endpoint, usage, False, cost, request_id,
                                 content=content if self.config.log_content else None,
                                 usage_source=usage_source(output))

    def prepare_chat(self, body: dict, clip_max_tokens: bool = False):
        """Validate a chat body and render its prompt: (request, prompt text, prompt ids, SamplingParams)."""
        req = ChatCompletionRequest.parse(body)
        messages, options = self.template.prompt_inputs(req, self.check_model(req.model))
        try:
            prompt = self.template.render(messages, options)
        except ValueError as e:  # messages the template refuses (its raise_exception, roles out of order...)
            raise bad_request(str(e), "messages") from None
        prompt += req.assistant_prefix or ""
        ids = self.tokenizer.encode(prompt)
        params = req.to_sampling_params(self.config.default_max_tokens, self.engine.max_model_len, len(ids),
                                        self.config.default_sampling, clip_max_tokens,
                                        self.template.structured_outputs(req))
        return req, prompt, ids, params

    async def run_chat(self, key_id: str, req, prompt: str, ids: list[int], params, request_id: str,
                       priority: int = 0, bill: bool = True, start: float | None = None):
        """Run a non-streamed chat request to the end: (ChatCompletion, final engine output) when not billing
        here (the batch worker bills with the line), else the ChatCompletion after billing. Interactive
        requests (bill=True) are timed into the latency histograms from `start` (perf_counter)."""
        timer = self.metrics.timer(start) if bill else None
        stream = self.engine.generate({"prompt_token_ids": ids, "prompt": prompt, "model": req.model}, params,
                                      request_id, cache_salt(key_id, req), priority, restartable=True)
        last = None
        try:
            last = await self.first_output(stream)
            if timer:
                timer.feed(last)
            async for last in stream:  # noqa: B007 (the last output is the answer)
                if timer:
                    timer.feed(last)
        except BaseException:  # client gone (unless_disconnected) or failed: abort (frees the blocks) and
            await stream.aclose()  # bill what was generated, as a stream's end does
            if bill and last is not None:
                await asyncio.to_thread(self.bill, key_id, "/v1/chat/completions", last, request_id, prompt)
            raise
        text = self.tokenizer.decode
        response = chat_completion_from_output(last, req.model, int(time.time()),
                                               starts_in_reasoning=prompt_opens_reasoning(prompt),
                                               token_text=lambda i: text([i]), id=request_id,
                                               tool_parser=self.template.tool_parser(req))
        if not bill:
            self.metrics.count_usage("batch:/v1/chat/completions", last.usage)
            return response, last
        await asyncio.to_thread(self.bill, key_id, "/v1/chat/completions", last, request_id, prompt)
        return response

    def prepare_completion(self, body: dict):
        """Validate a completions body: (request, prompt id lists, one SamplingParams per prompt)."""
        req = CompletionRequest.parse(body)
        self.check_model(req.model)
        texts = req.prompts()
        if req.suffix:  # fill-in-the-middle, in the model's own format
            if not has_fim(self.tokenizer):
                raise bad_request(f"suffix (fill-in-the-middle) needs a model whose tokenizer has FIM tokens; "
                                  f"'{self.config.model_name}' has none.", "suffix")
            texts = [fim_prompt(text, req.suffix, self.tokenizer) for text in texts]
        prompts = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in texts]
        if len(prompts) > 1 and req.stream:
            raise bad_request("Streaming takes one prompt per request.", "prompt")
        max_model_len = self.engine.max_model_len
        structured = self.template.json_outputs(req)
        return req, prompts, [req.to_sampling_params(16, max_model_len, len(ids), self.config.default_sampling,
                                                     structured_outputs=structured) for ids in prompts]

    def completion_token_text(self, req):
        """How a completion's logprobs name tokens: their text, or "token_id:<id>" when the request asks
        (return_tokens_as_token_ids, vLLM's; a gateway in front asks, text can be ambiguous)."""
        if req.return_tokens_as_token_ids:
            return lambda i: f"token_id:{i}"
        text = self.tokenizer.decode
        return lambda i: text([i])

    async def run_completion(self, key_id: str, req, prompts: list[list[int]], params: list, request_id: str,
                             priority: int = 0, bill: bool = True, start: float | None = None):
        """All prompts concurrently to the end; like run_chat, returns (Completion, outputs) when not billing."""

        lasts = [None] * len(prompts)  # each prompt's latest output

        async def run(i: int, ids: list[int]):
            timer = self.metrics.timer(start) if bill else None
            stream = self.engine.generate({"prompt_token_ids": ids, "model": req.model}, params[i], f"{request_id}-{i}",
                                          cache_salt(key_id, req), priority, restartable=True)
            try:
                lasts[i] = await self.first_output(stream)
                if timer:
                    timer.feed(lasts[i])
                async for lasts[i] in stream:
                    if timer:
                        timer.feed(lasts[i])
                return lasts[i]
            finally:
                await stream.aclose()

        tasks = [asyncio.ensure_future(run(i, ids)) for i, ids in enumerate(prompts)]
        try:
            outputs = await asyncio.gather(*tasks)
        except BaseException:  # client gone or one prompt failed: stop the others, bill what was generated
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for i, out in enumerate(lasts):
                if bill and out is not None:
                    await asyncio.to_thread(self.bill, key_id, "/v1/completions", out, f"{request_id}-{i}")
            raise
        response = completion_from_outputs(outputs, req.model, int(time.time()), id=request_id, n=params[0].n,
                                           echo=bool(req.echo), token_text=self.completion_token_text(req))
        if not bill:
            for out in outputs:
                self.metrics.count_usage("batch:/v1/completions", out.usage)
            return response, outputs
        for i, out in enumerate(outputs):
            await asyncio.to_thread(self.bill, key_id, "/v1/completions", out, f"{request_id}-{i}")
        return response

    async def sse_events(self, stream: AsyncIterator, first, chunks, include_usage: bool, start: float, key_id: str,
                         endpoint: str, request_id: str, prompt: str | None = None, reserved: list[str] = ()):
        """The server-sent events of one streamed request (chunks: a ChatStream or CompletionStream)."""
        timer, last = self.metrics.timer(start), first
        try:
            timer.feed(first)
            for chunk in (chunks.start() if hasattr(chunks, "start") else []) + chunks.feed(first):
                yield sse(chunk)
            async for last in stream:
                timer.feed(last)
                for chunk in chunks.feed(last):
                    yield sse(chunk)
            if include_usage:
                usage = last.usage if isinstance(chunks, ChatStream) else [last.usage]
                yield sse(chunks.usage_chunk(usage))
            yield SSE_DONE
        except Exception as e:  # the 200 headers are out: say so in the stream, then end it as usual
            error = unavailable(str(e)) if isinstance(e, EngineDeadError) else e
            yield f"data: {json.dumps(stream_error_body(error))}\n\n"
            yield SSE_DONE
        finally:  # also on disconnect: abort (frees the blocks) and bill what was generated
            await stream.aclose()
            # In a worker thread: a ledger commit waits for an fsync, and on the event loop it would hold up
            # every other stream (the streams of one step end together: the last [DONE] waited for all of
            # their commits). Shielded, so that a cancelled response (the client gone) still bills.
            await asyncio.shield(asyncio.to_thread(self.bill, key_id, endpoint, last, request_id, prompt))
            await self.release(reserved)

    async def unless_disconnected(self, request: Request, work):
        """Await a non-streamed request's run_chat/run_completion, cancelling it if the client hangs up
        first: it then aborts the engine request and bills what was generated, as a stream's end does."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if task.cancelled():
            return Response(status_code=499)  # nginx's "client closed request": nobody is there to read it
        return task.result()

    async def first_output(self, stream: AsyncIterator):
        """Start a request: engine-side input errors surface here, before any response is sent."""
        try:
            return await stream.__anext__()
        except ValueError as e:
            raise bad_request(str(e), str(e).split(":", 1)[0] if ":" in str(e) else None) from None


def cache_salt(key_id: str, req) -> str:
    """The engine's prefix-cache salt: the key (no two keys share cached blocks), split further by the
    request's own `cache_salt` (vLLM's field; a gateway in front sends one per key of its own)."""
    return key_id if req.cache_salt is None else f"{key_id}\x00{req.cache_salt}"


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body is read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(server: Server) -> FastAPI:
    from openr2.server.account import add_account_routes
    from openr2.server.anthropic import add_anthropic_routes
    from openr2.server.batches import BatchWorker, add_batch_routes
    from openr2.server.pages import add_page_routes

    server.batch_worker = BatchWorker(server)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(server.ledger.release_all)  # reservations of a process that died (balance_store.py)
        if hasattr(server.engine, "start"):  # a gateway's upstreams: connections and health probes
            await server.engine.start()
        worker = asyncio.create_task(server.batch_worker.run())
        yield
        worker.cancel()
        # let its shutdown run now (handing claimed batch lines back): uvicorn may re-raise SIGTERM as soon as
        # the lifespan ends, before a merely cancelled task gets another turn
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        if hasattr(server.engine, "stop"):
            await server.engine.stop()

    # Private by default: FastAPI's built-in OpenTelemetry (0.165+) could export spans when OTEL_*
    # variables are set; this server never sends anything anywhere, so it is switched off.
    no_telemetry = {"telemetry": {"tracing": False, "metrics": False, "logs": False, "auto_configure": False}} \
        if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {}
    docs = {} if server.config.docs else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="openr2", description="OpenAI-compatible API for openr2 models, served locally.",
                  lifespan=lifespan, **docs, **no_telemetry)
    app.state.server = server
    install_error_handlers(app)

    async def on_engine_dead(request: Request, exc: EngineDeadError):
        err = unavailable(f"The model is unavailable: {exc}.")
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    app.add_exception_handler(EngineDeadError, on_engine_dead)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=server.config.max_body_bytes,
                       max_file_bytes=server.config.max_file_bytes)
    app.add_middleware(MetricsMiddleware, metrics=server.metrics)  # it counts the 413s too
    app.add_middleware(PathAliasMiddleware)  # outermost: /beta, /anthropic/v1 and root paths are /v1 routes
    add_batch_routes(app, server)
    add_page_routes(app, server)
    add_account_routes(app, server)
    add_anthropic_routes(app, server)

    @app.get("/health")
    async def health():
        if server.engine.failure is not None:  # for load balancers and supervisors: take it out, restart it
            return JSONResponse({"status": "failed", "model": server.config.model_name,
                                 "reason": server.engine.failure}, status_code=503)
        return {"status": "ok", "model": server.config.model_name}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        # no API key, like /health and vLLM's /metrics: counts and timings only (see metrics.py)
        body, content_type = server.metrics.exposition()
        return Response(body, media_type=content_type)

    def served_model(name: str) -> Model:
        root = server.config.model_name
        return Model(id=name, created=server.created, max_model_len=server.engine.max_model_len,
                     root=None if name == root else root)

    @app.get("/v1/models")
    async def models(request: Request):
        await server.authorise(request)
        return ModelList(data=[served_model(name) for name in server.model_names])

    @app.get("/v1/models/{model_id:path}")  # :path: served names such as "deepseek-ai/DeepSeek-R1" have slashes
    async def model(request: Request, model_id: str):
        await server.authorise(request)
        server.check_model(model_id)
        return served_model(model_id)

    @app.post("/v1/chat/completions", openapi_extra=json_body_doc(ChatCompletionRequest))
    async def chat_completions(request: Request):
        start = time.perf_counter()
        key_id = await server.authorise(request)
        req, prompt, ids, params = server.prepare_chat(await server.body(request))
        await server.admit(key_id, len(ids) + params.max_tokens * params.n)
        request_id = random_id("chatcmpl-")
        reserved = await server.reserve(key_id, {request_id: server.prices.worst_case(len(ids),
                                                                                      params.max_tokens * params.n)})
        starts = prompt_opens_reasoning(prompt)
        if not req.stream:
            return await server.released_after(reserved, server.unless_disconnected(
                request, server.run_chat(key_id, req, prompt, ids, params, request_id, start=start)))
        try:  # a stream releases at its end (sse_events)
            stream = server.engine.generate({"prompt_token_ids": ids, "prompt": prompt, "model": req.model}, params,
                                            request_id, cache_salt(key_id, req))
            first = await server.first_output(stream)
        except BaseException:
            await server.release(reserved)
            raise
        text = server.tokenizer.decode
        chunks = ChatStream(request_id, req.model, int(time.time()), params.n, starts_in_reasoning=starts,
                            token_text=lambda i: text([i]), tool_parser=server.template.tool_parser(req))
        events = server.sse_events(stream, first, chunks, req.include_usage, start, key_id, "/v1/chat/completions",
                                   request_id, prompt, reserved)
        return StreamingResponse(events, media_type="text/event-stream")

    @app.post("/v1/completions", openapi_extra=json_body_doc(CompletionRequest))
    async def completions(request: Request):
        start = time.perf_counter()
        key_id = await server.authorise(request)
        req, prompts, params = server.prepare_completion(await server.body(request))
        await server.admit(key_id, sum(len(ids) + p.max_tokens * p.n for ids, p in zip(prompts, params)))
        request_id = random_id("cmpl-")
        # each prompt is billed on its own (request_id-i; a stream's one prompt as request_id): reserved alike
        bill_ids = [request_id] if req.stream else [f"{request_id}-{i}" for i in range(len(prompts))]
        reserved = await server.reserve(key_id, {rid: server.prices.worst_case(len(ids), p.max_tokens * p.n)
                                                 for rid, ids, p in zip(bill_ids, prompts, params)})
        if not req.stream:
            return await server.released_after(reserved, server.unless_disconnected(
                request, server.run_completion(key_id, req, prompts, params, request_id, start=start)))
        try:
            stream = server.engine.generate({"prompt_token_ids": prompts[0], "model": req.model}, params[0], request_id,
                                            cache_salt(key_id, req))
            first = await server.first_output(stream)
        except BaseException:
            await server.release(reserved)
            raise
        chunks = CompletionStream(request_id, req.model, int(time.time()), params[0].n, echo=bool(req.echo),
                                  token_text=server.completion_token_text(req))
        events = server.sse_events(stream, first, chunks, req.include_usage, start, key_id, "/v1/completions",
                                   request_id, reserved=reserved)
        return StreamingResponse(events, media_type="text/event-stream")

    return app
