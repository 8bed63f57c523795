"""Where completions come from: the local engine, or any OpenAI-compatible chat endpoint over HTTP.

Owns turning a `Request` (one sample of one item: messages + sampling) into a `Completion` (reasoning,
answer text, finish reason, usage), yielding them as they finish so the runner can save and score as it
goes. Both backends split reasoning from the answer the way our server does, so the same model gives the
same answers either way; neither grades.

  LocalBackend   a checkpoint through LLMEngine (continuous batching: every request is queued at once),
                 with the sampling defaults of its generation_config.json, as the server applies them.
  HTTPBackend    POST {base_url}/chat/completions, `concurrency` requests in flight (threads);
                 429 and 5xx (and dropped connections) are retried with exponential backoff, waiting at
                 least what Retry-After / retry-after-ms asks; any other error stops the run with the
                 endpoint's own message. Standard library only (urllib), so nothing else is needed.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import queue
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from openr2.engine.usage import Usage

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)


@dataclass(frozen=True)
class Request:
    item_id: str
    index: int  # sample number 0..K-1
    messages: list[dict]
    temperature: float
    top_p: float
    max_tokens: int | None  # None: the server's default (ours: engine.sampling.max_tokens_for)
    seed: int


@dataclass
class Completion:
    content: str  # the answer: all that is graded
    reasoning: str | None
    finish_reason: str | None
    usage: Usage


class EndpointError(ValueError):
    """The endpoint refused or could not be reached; the message says which and what to do."""


def _split_answer(content: str, reasoning: str | None) -> tuple[str | None, str]:
    """Endpoints that leave `<think>...</think>` in content: the reasoning goes, only the answer is kept."""
    from openr2.tasks.answers import split_think

    if reasoning is None:
        thought, answer = split_think(content)
        if answer is not None:
            return thought, answer
    return reasoning, content


class LocalBackend:
    """A checkpoint directory (or a loaded LLMEngine) run in this process."""

    name = "local"

    def __init__(self, model, dtype: str = "float32", device: str = "cpu", engine_config=None):
        from openr2.engine.engine import EngineConfig, LLMEngine

        if isinstance(model, LLMEngine):
            self.engine = model
        else:
            import torch

            self.engine = LLMEngine.from_pretrained(str(model), engine_config or EngineConfig(), getattr(torch, dtype),
                                                    device)
        if self.engine.tokenizer is None:
            raise ValueError(f"{model}: no tokenizer.json, so prompts cannot be encoded")
        # options a request leaves out come from generation_config.json, exactly as `openr2 serve` fills them
        self.defaults = {}
        if not isinstance(model, LLMEngine):
            from openr2.engine.sampling import generation_defaults

            self.defaults = generation_defaults(str(model))

    def run(self, requests: list[Request]) -> Iterator[tuple[Request, Completion]]:
        from openr2.chat_format import ReasoningParser, prompt_opens_reasoning, render_chat
        from openr2.engine.sampling import SamplingParams, max_tokens_for

        tok, pending = self.engine.tokenizer, {}
        try:
            for n, r in enumerate(requests):
                # as the server renders it (a template-less V3.2 checkpoint included), so both see the same ids
                text = render_chat(r.messages, tok, model_type=self.engine.model.config.model_type)
                ids = tok.encode(text)
                room = self.engine.max_model_len - len(ids)
                max_tokens = max_tokens_for(r.max_tokens, self.engine.max_model_len, len(ids))  # as served
                if max_tokens > room or max_tokens < 1:  # the server answers 400; so do we
                    raise ValueError(f"item {r.item_id}: {len(ids)} prompt tokens + max_tokens {max_tokens} exceed "
                                     f"the model's context of {self.engine.max_model_len}; lower --max-tokens")
                params = SamplingParams(**{**self.defaults, "temperature": r.temperature, "top_p": r.top_p,
                                           "max_tokens": max_tokens, "seed": r.seed})
                request_id = f"eval-{n}-{r.item_id}-{r.index}"
                self.engine.add_request(request_id, {"prompt_token_ids": ids, "prompt": text}, params)
                pending[request_id] = (r, prompt_opens_reasoning(text))
            while pending:
                for out in self.engine.step():
                    if not out.finished or out.request_id not in pending:
                        continue
                    r, opens = pending.pop(out.request_id)
                    sample = out.outputs[0]
                    reasoning, content = ReasoningParser(starts_in_reasoning=opens).parse(sample.text)
                    reasoning, content = _split_answer(content, reasoning)
                    yield r, Completion(content, reasoning, sample.finish_reason, out.usage)
        finally:  # interrupted or failed: free what is still queued
            for request_id in pending:
                self.engine.abort(request_id)

    def close(self) -> None:
        pass


class HTTPBackend:
    """Any OpenAI-compatible /chat/completions endpoint (our `openr2 serve`, vLLM, DeepSeek's API...)."""

    name = "http"

    def __init__(self, base_url: str, model_name: str, api_key: str | None = None, concurrency: int = 8,
                 max_retries: int = 5, backoff_s: float = 1.0, max_backoff_s: float = 60.0, timeout_s: float = 600.0):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url {base_url!r}: expected http://... or https://... (e.g. http://127.0.0.1:8000/v1)")
        if concurrency < 1 or max_retries < 0:
            raise ValueError("concurrency must be >= 1 and retries >= 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model_name, self.api_key, self.concurrency = model_name, api_key, concurrency
        self.max_retries, self.backoff_s, self.max_backoff_s, self.timeout_s = max_retries, backoff_s, max_backoff_s, timeout_s
        self.retries = 0  # how many retries this backend has made (reported in the summary)

    def body(self, r: Request) -> dict:
        body = {"model": self.model_name, "messages": r.messages, "temperature": r.temperature, "top_p": r.top_p,
                "max_tokens": r.max_tokens, "seed": r.seed, "stream": False}
        if r.max_tokens is None:  # leave the cap to the endpoint (ours: 4096, clipped to the context)
            del body["max_tokens"]
        return body

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "openr2-eval"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.max_retries + 1):
            wait_s = None
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code not in RETRY_STATUS and e.code < 500:
                    hint = " (check --api-key)" if e.code in (401, 403) else \
                        " (check --model-name and --base-url)" if e.code == 404 else ""
                    raise EndpointError(f"{self.url}: HTTP {e.code}: {message}{hint}") from None
                wait_s = _retry_after_s(e.headers)
                last = f"HTTP {e.code}: {message}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timed out
                reason = getattr(e, "reason", e)
                last = f"cannot reach the endpoint: {reason}"
            except json.JSONDecodeError:
                raise EndpointError(f"{self.url}: the response is not JSON") from None
            if attempt == self.max_retries:
                break
            self.retries += 1
            backoff = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)
            time.sleep(max(backoff, min(wait_s, self.max_backoff_s) if wait_s is not None else 0.0))
        raise EndpointError(f"{self.url}: {last} (after {self.max_retries + 1} attempts)")

    def complete(self, r: Request) -> Completion:
        response = self._post(self.body(r))
        try:
            choice = response["choices"][0]
            message = choice["message"]
            content = message.get("content") or ""
            reasoning = message.get("reasoning_content", message.get("reasoning"))
            usage = response.get("usage") or {}
        except (KeyError, IndexError, TypeError, AttributeError):
            raise EndpointError(f"{self.url}: unexpected response shape: {json.dumps(response)[:200]}") from None
        reasoning, content = _split_answer(content, reasoning)
        return Completion(content, reasoning, choice.get("finish_reason"), _usage(usage))

    def run(self, requests: list[Request]) -> Iterator[tuple[Request, Completion]]:
        """Completions as they finish, at most `concurrency` in flight; the first hard error stops the run.

        Each request runs on a daemon thread, so an error or Ctrl-C returns at once instead of waiting for
        the requests still in flight (whose answers are dropped; a resumed run asks them again)."""
        results: queue.SimpleQueue = queue.SimpleQueue()

        def work(r: Request) -> None:
            try:
                results.put((r, self.complete(r), None))
            except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
                results.put((r, None, e))

        todo, in_flight = list(reversed(requests)), 0
        while todo or in_flight:
            while todo and in_flight < self.concurrency:  # submit lazily: after a failure nothing more is sent
                threading.Thread(target=work, args=(todo.pop(),), name="openr2-eval", daemon=True).start()
                in_flight += 1
            r, completion, error = results.get()
            in_flight -= 1
            if error is not None:
                raise error
            yield r, completion

    def close(self) -> None:
        pass


def _error_message(e: urllib.error.HTTPError) -> str:
    """OpenAI's error JSON message, else the body's start, else the reason phrase."""
    try:
        raw = e.read().decode("utf-8", "replace")
    except Exception:
        raw = ""
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw.strip()[:200] or str(e.reason)


def _retry_after_s(headers) -> float | None:
    """Seconds the server asked us to wait: retry-after-ms, else Retry-After (seconds or an HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _usage(u: dict) -> Usage:
    """An OpenAI/DeepSeek usage object -> the engine's Usage (cache hits from either field name)."""
    def count(d, key):
        v = (d or {}).get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0

    prompt, completion = count(u, "prompt_tokens"), count(u, "completion_tokens")
    cached = count(u, "prompt_cache_hit_tokens") or count(u.get("prompt_tokens_details"), "cached_tokens")
    reasoning = count(u.get("completion_tokens_details"), "reasoning_tokens")
    return Usage(prompt, min(cached, prompt), completion, min(reasoning, completion))
