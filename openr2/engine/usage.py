"""Usage: the token counts of one request, as the engine reports them and billing, the ledger, metrics,
the API's usage object and eval read them. Torch-free, so an HTTP-only client (eval against an endpoint)
can use it without loading the engine."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Usage:
    """Token counts of one request, as the engine reports them.

    `cached_prompt_tokens` are prompt tokens served from the prefix cache (billed at the cache-hit price);
    the rest of the prompt is a cache miss. `reasoning_tokens` are part of `completion_tokens` (DeepSeek
    bills chain-of-thought as ordinary output) and are kept only for reporting.
    """

    prompt_tokens: int
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    def __post_init__(self):
        for name in _COUNTS:  # names spelt out: dataclasses.fields() per Usage cost a streamed token ~5 us
            value = getattr(self, name)
            if type(value) is not int or value < 0:  # bool and other int subclasses are not counts
                raise ValueError(f"usage.{name} must be a non-negative integer, got {value!r}")
        if self.cached_prompt_tokens > self.prompt_tokens:
            raise ValueError(f"usage.cached_prompt_tokens ({self.cached_prompt_tokens}) exceeds "
                             f"usage.prompt_tokens ({self.prompt_tokens})")
        if self.reasoning_tokens > self.completion_tokens:
            raise ValueError(f"usage.reasoning_tokens ({self.reasoning_tokens}) exceeds "
                             f"usage.completion_tokens ({self.completion_tokens})")

    @property
    def cache_miss_tokens(self) -> int:
        return self.prompt_tokens - self.cached_prompt_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def of(cls, counts) -> Usage:
        """From any object with the four count attributes (the engine's own Usage, for one)."""
        if isinstance(counts, cls):
            return counts
        return cls(*(getattr(counts, f.name) for f in fields(cls)))

    @classmethod
    def total(cls, usages) -> Usage:
        """The sum of several requests' counts (a completions call with several prompts)."""
        usages = list(usages)
        return cls(*(sum(getattr(u, f.name) for u in usages) for f in fields(cls)))


_COUNTS = tuple(f.name for f in fields(Usage))
