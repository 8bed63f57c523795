"""Request body size limits, enforced while the body is read rather than after it is in memory.

Owns `BodyLimitMiddleware`, a pure ASGI middleware in front of every route. A request whose Content-Length
is over its limit is answered 413 before one byte of the body is read (a client that sent
`Expect: 100-continue` never has to send it); a chunked body is counted as it arrives and the read fails
with a 413 as soon as the running total passes the limit, so an oversized body costs at most one limit's
worth of memory, not its own size. The 413 is OpenAI's error JSON (errors.py). Uploads to /v1/files have
their own, larger limit. Which limits apply is ServerConfig's business (max_body_bytes, max_file_bytes).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from openr2.server.errors import error_body_for, too_large

FILES_PATH = "/v1/files"  # multipart uploads: ServerConfig.max_file_bytes, every other route max_body_bytes


class BodyLimitMiddleware:
    def __init__(self, app, max_body_bytes: int, max_file_bytes: int):
        self.app, self.max_body_bytes, self.max_file_bytes = app, max_body_bytes, max_file_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["path"] == FILES_PATH
        limit = self.max_file_bytes if upload else self.max_body_bytes
        what, param = ("File uploads are", "file") if upload else ("Request bodies are", None)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            err = too_large(f"{what} limited to {limit} bytes; this one declares {int(declared)}.", param)
            return await JSONResponse(error_body_for(scope["path"], err), err.status)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # raised inside the handler's read: the app's APIError handler answers the 413, and the
                    # rest of the body is never buffered (the server discards it as it arrives)
                    raise too_large(f"{what} limited to {limit} bytes.", param)
            return message

        await self.app(scope, counted, send)
