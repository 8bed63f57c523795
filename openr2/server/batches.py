"""Files and batches, as OpenAI's Batch API: the /v1/files and /v1/batches routes and the batch worker.

The worker runs inside the server's event loop. It resumes every unfinished batch at startup (lines a
killed server had claimed go back to pending: they were never committed, so never billed), validates new
batches, runs their lines through the same code as the interactive endpoints but at batch priority (they
yield to interactive requests in the scheduler), and records each line's response together with its bill,
at the batch discount, in one transaction. Finished batches get their output and error files.

Replicas (several servers on one PostgreSQL ledger) share the queue: each claims lines under a lease that
its heartbeat renews, and takes over the lines of a replica whose lease lapsed (batch_store.py).

Failures stay with their line: whatever makes a line fail is recorded as that line's error (the 4xx the
interactive endpoint would answer, or a 500) and the batch goes on to complete. An input file that cannot
be validated fails its batch once, with the reason in `errors`. Only a dead engine leaves lines claimed:
the process exits, and the next start runs them.

Prepaid balances: each line reserves its worst case at the batch price when it starts (balance_store.py);
a line the balance cannot cover fails with a 402 in the error file, the others go on.

Rate limits: a batch line counts against its key's requests and tokens per minute (prompt + max_tokens
x n, as an interactive request does), but waits for room instead of failing with a 429. A line that alone
needs more than a minute's tokens is that line's 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response

from openr2.engine.async_engine import EngineDeadError
from openr2.engine.usage import Usage
from openr2.server.batch_store import BatchStateError
from openr2.server.errors import APIError, bad_request, internal_error, not_found
from openr2.server.ledger import usage_source

logger = logging.getLogger("openr2.server")
BATCH_PRIORITY = 1


def _page(items: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": items, "has_more": has_more,
            "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None}


def _as_400(e: ValueError) -> APIError:
    message = str(e)
    param = message.split(":", 1)[0] if ":" in message and " " not in message.split(":", 1)[0] else None
    return APIError(409 if isinstance(e, BatchStateError) else 400, message, param=param)


def _limit(limit: int, most: int) -> int:
    """A page size from the query: 1..most, else a 400 (not a ValueError deep in the ledger, nor an
    integer too large for SQLite)."""
    if not 1 <= limit <= most:
        raise bad_request(f"limit must be between 1 and {most}, got {limit}.", "limit")
    return limit


def add_batch_routes(app: FastAPI, server) -> None:
    ledger = server.ledger

    @app.post("/v1/files")
    async def create_file(request: Request):
        key_id = await server.authorise(request)
        form = await request.form()  # at most ServerConfig.max_file_bytes: limits.py stops the read
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str):
            raise bad_request("Upload the JSONL as the multipart field 'file'.", "file")
        content = await upload.read()
        if purpose != "batch":
            raise bad_request("purpose must be 'batch'.", "purpose")
        try:
            return await asyncio.to_thread(ledger.create_file, key_id, upload.filename or "upload.jsonl", purpose,
                                           content)
        except ValueError as e:
            raise _as_400(e) from None

    @app.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None, after: str | None = None, limit: int = 100):
        key_id = await server.authorise(request)
        return _page(*await asyncio.to_thread(ledger.list_files, key_id, purpose, after, _limit(limit, 10_000)))

    @app.get("/v1/files/{file_id}")
    async def get_file(request: Request, file_id: str):
        found = await asyncio.to_thread(ledger.get_file, await server.authorise(request), file_id)
        if found is None:
            raise not_found(f"No such file: {file_id}", "file_id")
        return found

    @app.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str):
        key_id = await server.authorise(request)
        path = await asyncio.to_thread(ledger.file_path, key_id, file_id)
        if path is not None:
            return FileResponse(path, media_type="application/octet-stream")
        content = await asyncio.to_thread(ledger.read_file, key_id, file_id)  # in the database (PostgreSQL)
        if content is None:
            raise not_found(f"No such file: {file_id}", "file_id")
        return Response(content, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str):
        if not await asyncio.to_thread(ledger.delete_file, await server.authorise(request), file_id):
            raise not_found(f"No such file: {file_id}", "file_id")
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches")
    async def create_batch(request: Request):
        key_id = await server.authorise(request)
        body = await server.body(request)
        if not isinstance(body.get("input_file_id"), str) or not isinstance(body.get("endpoint"), str):
            raise bad_request("input_file_id and endpoint are required strings.", "input_file_id")
        if not isinstance(body.get("completion_window", "24h"), str):
            raise bad_request("completion_window must be a string such as '24h'.", "completion_window")
        try:
            batch = await asyncio.to_thread(ledger.create_batch, key_id, body["input_file_id"], body["endpoint"],
                                            body.get("completion_window", "24h"), body.get("metadata"))
        except ValueError as e:
            raise _as_400(e) from None
        server.batch_worker.wake()
        return batch

    @app.get("/v1/batches")
    async def list_batches(request: Request, after: str | None = None, limit: int = 20):
        return _page(*await asyncio.to_thread(ledger.list_batches, await server.authorise(request), after,
                                              _limit(limit, 100)))

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(request: Request, batch_id: str):
        found = await asyncio.to_thread(ledger.get_batch, await server.authorise(request), batch_id)
        if found is None:
            raise not_found(f"No such batch: {batch_id}", "batch_id")
        return found

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, batch_id: str):
        try:
            found = await asyncio.to_thread(ledger.cancel_batch, await server.authorise(request), batch_id)
        except ValueError as e:
            raise _as_400(e) from None
        if found is None:
            raise not_found(f"No such batch: {batch_id}", "batch_id")
        return found


class BatchWorker:
    """Drives every active batch to its end, each in its own task (so that one key's batch waiting for its
    rate limits never holds up another key's), with `concurrency` lines per batch in the engine at once."""

    def __init__(self, server, concurrency: int = 8, poll_s: float = 0.5):
        self.server, self.concurrency, self.poll_s = server, concurrency, poll_s
        self._wake = asyncio.Event()
        self._driving: dict[str, asyncio.Task] = {}

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        ledger = self.server.ledger
        resumed = await asyncio.to_thread(ledger.reset_in_flight)
        if resumed:
            logger.info("resuming %d batch lines interrupted by the last shutdown", resumed)
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            while self.server.engine.failure is None:
                for batch_id in await asyncio.to_thread(ledger.list_active_batches):
                    if batch_id not in self._driving:
                        self._driving[batch_id] = asyncio.create_task(self._drive(batch_id))
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
        finally:  # shutdown: the lines in the engine are aborted; unfinished ones resume at the next start
            heartbeat.cancel()
            for task in list(self._driving.values()):
                task.cancel()
            try:  # to run again at once on another replica (a shared ledger), and its balance freed
                ledger.release_claims()
                ledger.release_all()
            except Exception:  # the database is gone too: the leases lapse instead
                logger.exception("could not hand the claimed batch lines back")

    async def _heartbeat(self) -> None:
        """Renew this process's leases on its batch lines and balance reservations (ledger.heartbeat), well
        within their length, so that other replicas take them back only once this process is gone."""
        ledger = self.server.ledger
        while True:
            await asyncio.sleep(ledger.lease_s / 4)
            try:
                await asyncio.to_thread(ledger.heartbeat)
            except Exception:  # the database is unreachable for now: tried again at the next beat
                logger.exception("heartbeat failed")

    async def _drive(self, batch_id: str) -> None:
        try:
            while await self._advance(batch_id):
                pass
        except EngineDeadError:
            pass  # run() stops too
        except Exception:  # the ledger failed (disk full...): logged, and tried again at the next poll
            logger.exception("batch %s failed to advance", batch_id)
        finally:
            del self._driving[batch_id]

    async def _advance(self, batch_id: str) -> bool:
        ledger = self.server.ledger
        try:
            batch = await asyncio.to_thread(ledger.validate_batch, batch_id, self.server.model_names)
        except Exception:  # an input validation did not foresee: fail the batch once, not at every poll
            logger.exception("batch %s: its input could not be validated", batch_id)
            batch = await asyncio.to_thread(ledger.fail_batch, batch_id, [{
                "code": "invalid_file", "line": None, "message": "the input file could not be validated",
                "param": "input_file_id"}])
        if batch["status"] == "in_progress":
            lines = await asyncio.to_thread(ledger.claim_pending, batch_id, self.concurrency)
            if lines:
                key_id = ledger.batch_owner(batch_id)
                await asyncio.gather(*(self._run_line(batch_id, batch["endpoint"], key_id, line) for line in lines))
                return True
        await asyncio.to_thread(ledger.finalize_batch, batch_id)
        return False

    async def _run_line(self, batch_id: str, endpoint: str, key_id: str, line: dict) -> None:
        """Run one line and record its response with its bill, or its error (not billed)."""
        server, request_id, reserved = self.server, line["id"], []
        try:
            if endpoint == "/v1/chat/completions":
                req, prompt, ids, params = server.prepare_chat(line["body"])
                await self._throttle(key_id, len(ids) + params.max_tokens * params.n)
                reserved = await self._reserve(key_id, request_id, [(len(ids), params)])
                response, out = await server.run_chat(key_id, req, prompt, ids, params, request_id, BATCH_PRIORITY,
                                                      bill=False)
                usage, outs = out.usage, [out]
            else:
                req, prompts, params = server.prepare_completion(line["body"])
                await self._throttle(key_id, sum(len(ids) + p.max_tokens * p.n for ids, p in zip(prompts, params)))
                reserved = await self._reserve(key_id, request_id, [(len(ids), p) for ids, p in zip(prompts, params)])
                response, outs = await server.run_completion(key_id, req, prompts, params, request_id,
                                                             BATCH_PRIORITY, bill=False)
                usage = Usage.total(o.usage for o in outs)
            # per output: a gateway's prompts may run on upstreams with their own prices (cost is linear)
            cost = sum(server.prices_for(o).cost(o.usage, batch=True) for o in outs)
            # the line's bill settles its reservation (same request id, same transaction)
            await asyncio.to_thread(server.ledger.complete_request, batch_id, line["custom_id"], 200,
                                    response.model_dump(), request_id, usage, cost, usage_source(*outs))
            return
        except EngineDeadError:
            raise  # not the line's fault: it stays claimed, and the next start runs it
        except APIError as e:  # the line's own fault, as the interactive endpoint would answer it
            error = e
        except Exception:
            logger.exception("batch %s: line %s failed", batch_id, line["custom_id"])
            error = internal_error()
        finally:
            await server.release(reserved)  # a no-op once the bill settled it
        await asyncio.to_thread(server.ledger.complete_request, batch_id, line["custom_id"], error.status,
                                error.body(), request_id)

    async def _reserve(self, key_id: str, request_id: str, prompts: list) -> list[str]:
        """Reserve a line's worst case at the batch price ((prompt length, SamplingParams) per prompt); a
        line its key's balance cannot cover fails with a 402, and the batch goes on."""
        prices = self.server.prices
        worst = sum(prices.worst_case(n, p.max_tokens * p.n, batch=True) for n, p in prompts)
        return await self.server.reserve(key_id, {request_id: worst})

    async def _throttle(self, key_id: str, tokens: int) -> None:
        """Wait until the key's rate limits admit `tokens` more (see the module docstring)."""
        try:
            while (wait := await self.server.acquire(key_id, tokens)) > 0:
                await asyncio.sleep(wait)
        except ValueError as e:  # more than a whole minute's budget: waiting would never help
            raise bad_request(str(e), "max_tokens") from None
