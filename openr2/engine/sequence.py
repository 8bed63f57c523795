"""Per-sequence state: tokens, how many are in the cache, its blocks and their hashes.

A request with n samples runs as one sequence through its prompt, then forks into n sequences that share
the prompt's full blocks. Draft tokens (speculative decoding) are not the sequence's tokens until a step
verifies them: they only ride along in the next step's row. Text state (detokeniser, stop strings, reasoning split) and the finish reason are the engine's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from openr2.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # sample index within its request (0..n-1)
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    salt: str | None = None
    priority: int = 0  # lower runs first: 0 interactive, 1 batch jobs
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose latent KV is in the cache
    num_cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    admitted: bool = False
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of its full blocks, in order
    num_registered: int = 0  # full blocks already offered to the prefix cache
    cumulative_logprob: float = 0.0
    draft_token_ids: list[int] = field(default_factory=list)  # proposed next tokens, verified by the next step
    # constrained decoding (engine/grammar.GrammarState) over the committed tokens: preemption recomputes the
    # same tokens, so it stays as it is
    grammar: Any = None
    cache_state: object = None  # the pool's per-sequence state between steps (DeepSeek-V4: v4_cache.V4RowState)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def next_token_ids(self, n: int) -> list[int]:
        """The n tokens from num_computed on: uncomputed tokens, then drafts."""
        out = self.token_ids[self.num_computed : self.num_computed + n]
        if len(out) < n:
            out += self.draft_token_ids[: n - len(out)]
        return out

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def reset_for_recompute(self) -> None:
        """After preemption: the cache is gone; prompt and generated tokens are prefilled again."""
        self.num_computed = 0
        self.block_table = []
        self.num_registered = 0
        self.draft_token_ids = []
        self.cache_state = None
        self.status = Status.WAITING
