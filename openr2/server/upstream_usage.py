"""Usage as an upstream engine reports it: the token counts the gateway bills on, from a response body or
the last chunks of a stream.

Owns reading the dialects: OpenAI's and vLLM's `usage` (`prompt_tokens_details.cached_tokens` when vLLM
runs with --enable-prompt-tokens-details), SGLang's (the same fields, with --enable-cache-report),
llama.cpp's server (`usage` plus `timings.cache_n`, the prompt tokens it took from its cache) and openr2's /
DeepSeek's own (`prompt_cache_hit_tokens`, `completion_tokens_details.reasoning_tokens`). Cache hits are
taken only from those fields: an upstream that says nothing about its cache is billed at the miss price.
Counting tokens where an upstream reports nothing is the caller's (gateway.py), with the tokenizer.
Pure functions, no HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

from openr2.engine.usage import Usage


@dataclass(frozen=True)
class ReportedUsage:
    """What an upstream said; None for each count it did not report."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_prompt_tokens: int | None = None
    reasoning_tokens: int | None = None


def _count(value) -> int | None:
    """A non-negative integer count, else None (a malformed field is treated as not reported)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _get(obj, *path):
    for name in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(name)
    return obj


def reported_usage(body: dict) -> ReportedUsage | None:
    """The usage in one response body or stream chunk, or None when it carries none."""
    if not isinstance(body, dict):
        return None
    usage, timings = body.get("usage"), body.get("timings")
    if not isinstance(usage, dict) and not isinstance(timings, dict):
        return None
    usage = usage if isinstance(usage, dict) else {}
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    cached = _count(_get(usage, "prompt_tokens_details", "cached_tokens"))
    if cached is None:
        cached = _count(usage.get("prompt_cache_hit_tokens"))  # DeepSeek's and openr2's name
    if isinstance(timings, dict):  # llama.cpp: prompt_n evaluated now, cache_n reused from its cache
        cache_n, prompt_n = _count(timings.get("cache_n")), _count(timings.get("prompt_n"))
        if cached is None and cache_n is not None:
            cached = cache_n
        if prompt is None and prompt_n is not None:
            prompt = prompt_n + (cache_n or 0)
        if completion is None:
            completion = _count(timings.get("predicted_n"))
    reasoning = _count(_get(usage, "completion_tokens_details", "reasoning_tokens"))
    if prompt is None and completion is None:
        return None
    return ReportedUsage(prompt, completion, cached, reasoning)


def merge(reported: ReportedUsage | None, *, prompt_tokens: int, completion_tokens, reasoning_tokens
          ) -> tuple[Usage, str]:
    """The billed Usage and where it came from ("upstream" when the upstream reported both prompt and
    completion counts, else "local"). `completion_tokens` / `reasoning_tokens` are callables counting locally,
    called only when the upstream did not report that count. Cache hits only ever come from the upstream;
    counts are clamped so that the Usage is consistent (cached <= prompt, reasoning <= completion)."""
    reported = reported or ReportedUsage()
    prompt = reported.prompt_tokens if reported.prompt_tokens is not None else prompt_tokens
    completion = reported.completion_tokens if reported.completion_tokens is not None else completion_tokens()
    reasoning = reported.reasoning_tokens if reported.reasoning_tokens is not None else reasoning_tokens()
    cached = min(reported.cached_prompt_tokens or 0, prompt)
    source = "upstream" if reported.prompt_tokens is not None and reported.completion_tokens is not None \
        else "local"
    return Usage(prompt, cached, completion, min(reasoning, completion)), source
