"""OpenAI-shaped errors: one exception type, its JSON body, and the FastAPI handlers that emit it.

Owns `APIError` and its constructors (400/401/402/404/413/429/503), the body
`{"error": {"message", "type", "param", "code"}}` that the `openai` client reads into `e.message`,
`e.param`, `e.code`, the translation of pydantic validation errors into a 400 naming the offending field,
the decoding of JSON bodies into what the rest of the server can take (`decode_json`: no deep nesting, no
lone surrogates), and `install_error_handlers`, which makes every failure of a FastAPI app answer in that shape: FastAPI's
default `{"detail": ...}` leaves the client with a bare "Error code: 400". Under Anthropic's route
(/v1/messages) the same errors answer in Anthropic's shape instead (`error_body_for`). Unexpected exceptions become a
500 with a generic message; the traceback goes to the server log, never into the body.

It does not decide policy (which limits apply, which parameters are unsupported): callers raise.
"""

from __future__ import annotations

import json
import logging
import math
import re

logger = logging.getLogger("openr2.server")

INVALID_REQUEST = "invalid_request_error"
INTERNAL_MESSAGE = "The server had an error while processing your request. Sorry about that!"
MAX_JSON_DEPTH = 64  # requests nest a few levels (tool schemas a dozen); deeper is an attack on recursion
_SURROGATE = re.compile("[\ud800-\udfff]")
_SCALARS = frozenset({int, float, bool, type(None)})


class APIError(Exception):
    """An error the client caused (4xx) or should retry (429/5xx), with OpenAI's fields."""

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


class ParamError(ValueError):
    """Raised inside pydantic validators: a ValueError (so pydantic collects it) that names its parameter."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def error_body(message: str, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Anthropic's Messages API answers its errors in its own shape: {"type": "error", "error": {"type", "message"}}
ANTHROPIC_PATH = "/v1/messages"
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_error_body(err: APIError) -> dict:
    kind = _ANTHROPIC_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def error_body_for(path: str, err: APIError) -> dict:
    """The error JSON of the API a path belongs to: Anthropic's under /v1/messages, else OpenAI's."""
    if path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/"):
        return anthropic_error_body(err)
    return err.body()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def not_found(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """e.g. not_found("The model 'x' does not exist", "model", "model_not_found")."""
    return APIError(404, message, INVALID_REQUEST, param, code)


def unauthorized(message: str = "Incorrect API key provided.", code: str = "invalid_api_key") -> APIError:
    return APIError(401, message, INVALID_REQUEST, None, code)


def payment_required(message: str) -> APIError:
    """402: the key's prepaid balance cannot cover the request (DeepSeek's "Insufficient Balance")."""
    return APIError(402, message, INVALID_REQUEST, None, "insufficient_balance")


def too_large(message: str = "The request body is too large.", param: str | None = None) -> APIError:
    return APIError(413, message, INVALID_REQUEST, param, "request_too_large")


def _retry_headers(retry_after_s: float | None) -> dict[str, str]:
    if retry_after_s is None:
        return {}
    retry_after_s = max(0.0, retry_after_s)
    # the openai client prefers retry-after-ms; retry-after must be whole seconds
    return {"retry-after": str(math.ceil(retry_after_s)), "retry-after-ms": str(math.ceil(retry_after_s * 1000))}


def rate_limited(retry_after_s: float | None, message: str = "Rate limit reached; retry later.",
                 type: str = "requests") -> APIError:
    """429 with retry-after headers; type is OpenAI's limit kind ("requests" or "tokens")."""
    return APIError(429, message, type, None, "rate_limit_exceeded", _retry_headers(retry_after_s))


def overloaded(message: str = "The server is overloaded; retry later.", retry_after_s: float | None = 1.0) -> APIError:
    """503: out of KV cache or shutting down (DeepSeek's insufficient_system_resource, which clients can retry)."""
    return APIError(503, message, "server_error", None, "server_overloaded", _retry_headers(retry_after_s))


def unavailable(message: str) -> APIError:
    """503 from a dead engine: only a restart helps (the server exits so that its supervisor restarts it)."""
    return APIError(503, message, "server_error", None, "engine_unavailable", _retry_headers(5.0))


def context_length_exceeded(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                            param: str = "messages") -> APIError:
    asked = f"{num_prompt_tokens} in the prompt" + (f" and {max_tokens} for the completion" if max_tokens else "")
    message = (f"This model's maximum context length is {max_model_len} tokens. However, you requested "
               f"{num_prompt_tokens + (max_tokens or 0)} tokens ({asked}). Please reduce the length of the "
               f"prompt or max_tokens.")
    return APIError(400, message, INVALID_REQUEST, param, "context_length_exceeded")


def internal_error() -> APIError:
    return APIError(500, INTERNAL_MESSAGE, "server_error")


def stream_error_body(exc: BaseException) -> dict:
    """What to send as `data: {...}` when a stream fails after the 200 headers went out."""
    if isinstance(exc, APIError):
        return exc.body()
    logger.error("stream failed", exc_info=exc)
    return internal_error().body()


# ---------------------------------------------------------------------------------------------- validation

def param_from_loc(loc: tuple | list) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"; None for the body as a whole."""
    parts = list(loc)
    return _json_path(parts[1:] if parts and parts[0] == "body" else parts)


def _json_path(parts) -> str | None:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier():
            out += f".{part}" if out else part
        else:
            break  # a pydantic union tag such as 'list[int]' or 'function-after[...]': not a field
    return out or None


def from_validation_errors(errors: list[dict]) -> APIError:
    """pydantic's `errors()` (or FastAPI's RequestValidationError.errors()) -> one 400 about the first error."""
    if not errors:
        return bad_request("Invalid request body.")
    err = errors[0]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return malformed_json()
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ParamError):
        return bad_request(str(cause), cause.param)
    param = param_from_loc(err.get("loc", ()))
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param)
    if param is None:
        return bad_request(f"Invalid request body: {err.get('msg', 'invalid value')}.")
    msg = str(cause) if isinstance(cause, ValueError) else err.get("msg", "invalid value")
    return bad_request(f"Invalid value for '{param}': {msg}.", param)


def malformed_json() -> APIError:
    return bad_request("We could not parse the JSON body of your request. The body must be valid JSON.")


def decode_json(raw: bytes | str):
    """json.loads that also refuses, with a ValueError, what later stages could not take: nesting deeper
    than MAX_JSON_DEPTH (recursive code, ours or a library's, would hit Python's recursion limit) and lone
    UTF-16 surrogates such as "\\ud800" (no UTF-8 encoding: the tokenizer, SQLite and the response fail),
    as a ParamError naming where. A json.JSONDecodeError (a ValueError too) means it is not JSON at all."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
    if isinstance(data, str):
        _check_text(data, ())
    stack = [(data, ())] if isinstance(data, (dict, list)) else []  # (container, path): no recursion of ours
    while stack:
        node, path = stack.pop()
        if len(path) >= MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(node, dict):
            for key in node:
                _check_text(key, path)
            items = node.items()
        elif _SCALARS.issuperset(map(type, node)):  # e.g. token ids: nothing inside (and checked at C speed)
            continue
        else:
            items = enumerate(node)
        for key, value in items:
            if isinstance(value, str):
                _check_text(value, (*path, key))
            elif isinstance(value, (dict, list)):
                stack.append((value, (*path, key)))
    return data


def _check_text(text: str, path: tuple) -> None:
    if not text.isascii() and _SURROGATE.search(text):
        raise ParamError(_json_path(path), "a lone UTF-16 surrogate (such as \\ud800) is not valid Unicode")


def parse_json_body(raw: bytes | str) -> dict:
    """Decode a request body that must be a JSON object; errors are 400s, not 500s."""
    try:
        data = decode_json(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise malformed_json() from None
    except ParamError as e:
        raise bad_request(f"Invalid value for '{e.param}': {e}." if e.param else f"Invalid request body: {e}.",
                          e.param) from None
    except ValueError as e:  # nested too deeply
        raise bad_request(f"Invalid request body: {e}.") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    return data


# ---------------------------------------------------------------------------------------------- FastAPI

def install_error_handlers(app) -> None:
    """Route every error of `app` to OpenAI's error JSON (FastAPI imported here, not at module import)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def respond(err: APIError, request) -> JSONResponse:
        return JSONResponse(error_body_for(request.url.path, err), status_code=err.status, headers=err.headers)

    async def on_api_error(request, exc: APIError):
        return respond(exc, request)

    async def on_validation_error(request, exc: RequestValidationError):
        return respond(from_validation_errors(list(exc.errors())), request)

    async def on_http_error(request, exc: HTTPException):
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})."
            if exc.detail and exc.detail != "Not Found":  # a route's own HTTPException(404, "...")
                message = str(exc.detail)
            err = APIError(404, message, INVALID_REQUEST, None, "not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"Method {request.method} is not allowed for {request.url.path}.",
                           INVALID_REQUEST, None, "method_not_allowed")
        elif exc.status_code == 413:
            err = too_large()
        else:
            kind = INVALID_REQUEST if exc.status_code < 500 else "server_error"
            err = APIError(exc.status_code, str(exc.detail), kind)
        err.headers.update(exc.headers or {})
        return respond(err, request)

    async def on_exception(request, exc: Exception):
        # Starlette re-raises after sending this response, so the server also logs the traceback.
        logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return respond(internal_error(), request)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_exception)
