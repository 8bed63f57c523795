"""Path aliases: the base URLs other platforms' clients are configured with, mapped onto our /v1 routes.

Owns `PathAliasMiddleware`, a pure ASGI middleware in front of every other one, which rewrites the path
of a request before anything else sees it (limits, metrics, routing), so each route exists once:

    /beta/<x>            -> /v1/<x>     DeepSeek's beta base URL (FIM: POST /beta/completions)
    /anthropic/v1/<x>    -> /v1/<x>     DeepSeek's Anthropic-format base URL (POST /anthropic/v1/messages)
    /<x> for an API word -> /v1/<x>     DeepSeek's base URL has no /v1 (http://host:port/chat/completions)

The root alias applies only to the first path segments of our API (ROOT_WORDS), so `GET /` stays the chat
page and `/health`, `/metrics`, `/openapi.json` keep their own paths. It does not know what the routes do.
"""

from __future__ import annotations

ROOT_WORDS = frozenset({"chat", "completions", "models", "files", "batches", "usage", "prices", "messages", "user"})
PREFIXES = ("/beta/", "/anthropic/v1/")


def canonical_path(path: str) -> str:
    """The /v1 path a request path stands for (itself when it is no alias)."""
    for prefix in PREFIXES:
        if path.startswith(prefix):
            return "/v1/" + path[len(prefix):]
    first = path[1:].split("/", 1)[0]
    if path.startswith("/") and first in ROOT_WORDS:
        return "/v1" + path
    return path


class PathAliasMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = canonical_path(scope["path"])
            if path != scope["path"]:
                raw = scope.get("raw_path")  # percent-encoded: rewritten alike (the prefixes are ASCII)
                raw = canonical_path(raw.decode("latin-1")).encode("latin-1") if raw else path.encode()
                scope = {**scope, "path": path, "raw_path": raw}
        await self.app(scope, receive, send)
