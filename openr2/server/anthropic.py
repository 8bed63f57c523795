"""Anthropic's Messages API: POST /v1/messages and POST /v1/messages/count_tokens (also under DeepSeek's
/anthropic base URL through aliases.py), for applications and coding agents written against the `anthropic` SDK.

A request is translated into a chat request (anthropic_protocol.to_chat_body) and goes the chat path's way:
the same template, thinking modes, keys (`x-api-key` or Bearer), rate limits, prepaid balance reservations,
engine, disconnect handling and bill in the same ledger (endpoint "/v1/messages"). Only the shapes differ:
the response and its stream events are Anthropic's, and so are the errors (errors.error_body_for).
It does not render, sample or price anything itself.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from openr2.chat_format import prompt_opens_reasoning
from openr2.engine.async_engine import EngineDeadError
from openr2.server.anthropic_protocol import (
    MessagesRequest,
    MessageStream,
    error_event,
    to_chat_body,
)
from openr2.server.errors import APIError, anthropic_error_body, internal_error, logger, unavailable
from openr2.server.protocol import json_body_doc, random_id

ENDPOINT = "/v1/messages"


def add_anthropic_routes(app: FastAPI, server) -> None:

    def prepare(body: dict):
        """(MessagesRequest, chat request, prompt, ids, SamplingParams, clipped)."""
        req = MessagesRequest.parse(body)
        chat, prompt, ids, params = server.prepare_chat(to_chat_body(req), clip_max_tokens=True)
        return req, chat, prompt, ids, params, params.max_tokens < req.max_tokens

    @app.post(ENDPOINT, openapi_extra=json_body_doc(MessagesRequest))
    async def messages(request: Request):
        start = time.perf_counter()
        key_id = await server.authorise(request)
        req, chat, prompt, ids, params, clipped = prepare(await server.body(request))
        await server.admit(key_id, len(ids) + params.max_tokens)
        msg_id = random_id("msg_")
        reserved = await server.reserve(key_id, {msg_id: server.prices.worst_case(len(ids), params.max_tokens)})
        events = MessageStream(msg_id, req.model, starts_in_reasoning=prompt_opens_reasoning(prompt),
                               clipped=clipped, omit_thinking=req.thinking is not None and req.thinking.display
                               == "omitted", tool_parser=server.template.tool_parser(chat))
        if not req.stream:
            return await server.released_after(reserved, server.unless_disconnected(
                request, run(key_id, prompt, ids, params, events, start)))
        try:
            stream = server.engine.generate({"prompt_token_ids": ids, "prompt": prompt, "model": req.model}, params,
                                            msg_id, key_id)
            first = await server.first_output(stream)
        except BaseException:
            await server.release(reserved)
            raise
        return StreamingResponse(stream_events(stream, first, events, key_id, msg_id, prompt, reserved, start),
                                 media_type="text/event-stream")

    async def run(key_id, prompt, ids, params, shape: MessageStream, start):
        """A non-streamed message: the engine run to its end and billed as run_chat does."""
        timer, msg_id = server.metrics.timer(start), shape.id
        stream = server.engine.generate({"prompt_token_ids": ids, "prompt": prompt, "model": shape.model}, params,
                                        msg_id, key_id, restartable=True)
        last = None
        try:
            last = await server.first_output(stream)
            timer.feed(last)
            async for last in stream:
                timer.feed(last)
        finally:  # also when the client is gone: abort, and bill what was generated
            await stream.aclose()
            if last is not None:
                await asyncio.shield(asyncio.to_thread(server.bill, key_id, ENDPOINT, last, msg_id, prompt))
        return shape.message(last)

    async def stream_events(stream, first, events: MessageStream, key_id, msg_id, prompt, reserved, start):
        timer, last = server.metrics.timer(start), first
        try:
            timer.feed(first)
            for e in events.start(first) + events.feed(first):
                yield e
            async for last in stream:
                timer.feed(last)
                for e in events.feed(last):
                    yield e
            for e in events.finish(last):
                yield e
        except Exception as e:  # the 200 headers are out: Anthropic's error event ends the stream
            if isinstance(e, EngineDeadError):
                e = unavailable(str(e))
            elif not isinstance(e, APIError):
                logger.error("stream failed", exc_info=e)
                e = internal_error()
            yield error_event(anthropic_error_body(e))
        finally:  # also on disconnect: abort (frees the blocks), bill what was generated, release the rest
            await stream.aclose()
            await asyncio.shield(asyncio.to_thread(server.bill, key_id, ENDPOINT, last, msg_id, prompt))
            await server.release(reserved)

    @app.post(ENDPOINT + "/count_tokens", openapi_extra=json_body_doc(MessagesRequest))
    async def count_tokens(request: Request):
        await server.authorise(request)
        body = await server.body(request)
        # max_tokens is no part of the count (nor of this request): as much as anything could ask for
        _, _, _, ids, _, _ = prepare({**body, "max_tokens": 2**31 - 1})
        return {"input_tokens": len(ids)}
