"""Usage from upstream bodies: final stream chunks shaped as vLLM, SGLang, llama.cpp's server, llama-cpp-python's
server and openr2 send them (written after their source and documentation, not captured from live servers
here: only openr2's runs in these tests), and how the gateway merges them with local counts."""

import pytest

from openr2.engine.usage import Usage
from openr2.server.upstream_usage import ReportedUsage, merge, reported_usage

# The last chunk of a streamed /v1/completions with stream_options.include_usage, in each server's shape.
VLLM = {  # vllm serve ... --enable-prompt-tokens-details
    "id": "cmpl-5b2c", "object": "text_completion", "created": 1733000000, "model": "deepseek-ai/DeepSeek-R1",
    "choices": [], "usage": {"prompt_tokens": 20, "total_tokens": 36, "completion_tokens": 16,
                             "prompt_tokens_details": {"cached_tokens": 16}}}
VLLM_NO_DETAILS = {"id": "cmpl-5b2d", "object": "text_completion", "created": 1733000000, "model": "m",
                   "choices": [], "usage": {"prompt_tokens": 20, "total_tokens": 36, "completion_tokens": 16,
                                            "prompt_tokens_details": None}}
SGLANG = {  # python -m sglang.launch_server ... --enable-cache-report
    "id": "8b1f", "object": "text_completion", "created": 1733000000, "model": "default", "choices": [],
    "usage": {"prompt_tokens": 20, "total_tokens": 36, "completion_tokens": 16,
              "prompt_tokens_details": {"cached_tokens": 8}, "completion_tokens_details": None}}
LLAMA_CPP = {  # llama-server: usage counts the whole prompt, timings split it into cached and evaluated
    "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}], "created": 1733000000,
    "model": "gpt-3.5-turbo", "system_fingerprint": "b6100-abc", "object": "text_completion",
    "usage": {"completion_tokens": 16, "prompt_tokens": 20, "total_tokens": 36}, "id": "chatcmpl-x",
    "timings": {"cache_n": 12, "prompt_n": 8, "prompt_ms": 10.5, "prompt_per_token_ms": 1.3,
                "prompt_per_second": 760.0, "predicted_n": 16, "predicted_ms": 120.0,
                "predicted_per_token_ms": 7.5, "predicted_per_second": 133.0}}
LLAMA_CPP_TIMINGS_ONLY = {"choices": [], "timings": {"cache_n": 4, "prompt_n": 6, "predicted_n": 3}}
LLAMA_CPP_PYTHON = {  # llama_cpp.server: counts, nothing about its cache
    "id": "cmpl-1", "object": "text_completion", "created": 1733000000, "model": "m.gguf",
    "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 16, "total_tokens": 36}}
OPENR2 = {  # openr2 serve: DeepSeek's cache fields and the reasoning count
    "id": "cmpl-9", "object": "text_completion", "created": 1733000000, "model": "tiny", "choices": [],
    "usage": {"prompt_tokens": 20, "completion_tokens": 16, "total_tokens": 36, "prompt_cache_hit_tokens": 16,
              "prompt_cache_miss_tokens": 4, "prompt_tokens_details": {"cached_tokens": 16},
              "completion_tokens_details": {"reasoning_tokens": 9}}}


@pytest.mark.parametrize("body, expected", [
    (VLLM, ReportedUsage(20, 16, 16, None)),
    (VLLM_NO_DETAILS, ReportedUsage(20, 16, None, None)),
    (SGLANG, ReportedUsage(20, 16, 8, None)),
    (LLAMA_CPP, ReportedUsage(20, 16, 12, None)),
    (LLAMA_CPP_TIMINGS_ONLY, ReportedUsage(10, 3, 4, None)),
    (LLAMA_CPP_PYTHON, ReportedUsage(20, 16, None, None)),
    (OPENR2, ReportedUsage(20, 16, 16, 9)),
])
def test_reported_usage_of_each_upstream(body, expected):
    assert reported_usage(body) == expected


@pytest.mark.parametrize("body", [
    {"choices": [{"text": "hi", "index": 0}]}, {"usage": None}, [], "usage", {"usage": {"total_tokens": 3}},
    {"usage": {"prompt_tokens": -1, "completion_tokens": True}},
])
def test_chunks_without_usable_usage(body):
    assert reported_usage(body) is None


def test_malformed_fields_count_as_not_reported():
    body = {"usage": {"prompt_tokens": 7, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": "3"}}}
    assert reported_usage(body) == ReportedUsage(7, 2, None, None)


def _never():
    raise AssertionError("counted locally although the upstream reported it")


def test_merge_prefers_the_upstream_and_prices_cache_hits_only_when_reported():
    usage, source = merge(reported_usage(VLLM), prompt_tokens=99, completion_tokens=_never,
                          reasoning_tokens=lambda: 5)
    assert (usage, source) == (Usage(20, 16, 16, 5), "upstream")
    usage, source = merge(reported_usage(LLAMA_CPP_PYTHON), prompt_tokens=99, completion_tokens=_never,
                          reasoning_tokens=lambda: 0)
    assert (usage, source) == (Usage(20, 0, 16, 0), "upstream")  # no cache field: all misses


def test_merge_counts_locally_what_is_missing():
    usage, source = merge(None, prompt_tokens=11, completion_tokens=lambda: 7, reasoning_tokens=lambda: 9)
    assert (usage, source) == (Usage(11, 0, 7, 7), "local")  # reasoning clamped to the completion
    usage, source = merge(ReportedUsage(None, 4, None, None), prompt_tokens=11, completion_tokens=_never,
                          reasoning_tokens=lambda: 0)
    assert (usage, source) == (Usage(11, 0, 4, 0), "local")


def test_merge_clamps_an_inconsistent_report():
    usage, _ = merge(ReportedUsage(5, 2, 9, 3), prompt_tokens=5, completion_tokens=_never, reasoning_tokens=_never)
    assert usage == Usage(5, 5, 2, 2)

