"""Constrained decoding: what a request's answer must match, and each sequence's grammar state.

Owns `StructuredOutputsParams` (vLLM's name: a JSON Schema, any JSON object, or an llguidance Lark grammar,
optionally after a trigger token), `GrammarCompiler` (the served tokenizer's view for the grammar library,
compiled grammars cached by text) and `GrammarState`, one per sequence: the matcher over its committed
tokens and the masks of the tokens it blocks at the next step's positions (the sampled one and each draft's).
The masks are packed bits (engine/token_mask.TokenMask), applied by the batched sampler
(sampling.apply_blocked); this module never sees logits. Each state computes its next position's mask ahead,
on one background thread, while the model runs (GrammarState.prefetch).

Reasoning stays free: a state starts with pending trigger tokens (the engine adds `</think>` when the prompt
opens a reasoning block; a request may add its own, e.g. the tool-calls marker for `tool_choice: auto`) and
constrains nothing until they have been generated in order. The state holds committed tokens only: drafts
are consumed tentatively to get their positions' masks and rolled back, so preemption (recompute of the same
tokens) and rejected drafts leave it as it was.

Library: llguidance, chosen over xgrammar on measurements (BENCHMARKS.md, bench/grammar_libs.py): a JSON
schema is ready in ~0.5 ms against ~115 ms for xgrammar's compile at a 128K vocabulary (a new schema per
request is the common case, and compiling blocks the engine step), masks cost ~10 us/token against ~4 us
(both far below a decode step), its Lark grammars name special tokens by id (DeepSeek's tool-call markers),
and its wheel has no dependencies (xgrammar pulls in triton and transformers).

Shape legend: K drafts of a row, V vocab (the model's; tokens past the tokenizer's are always blocked).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from openr2.engine.token_mask import TokenMask


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of json (a JSON Schema, dict or text), json_object (any JSON object) or grammar (llguidance
    Lark); trigger_token_ids: generation is free until these tokens have been generated, in order."""

    json: dict | str | None = None
    json_object: bool = False
    grammar: str | None = None
    trigger_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        given = [self.json is not None, bool(self.json_object), self.grammar is not None]
        if sum(given) != 1:
            raise ValueError("structured_outputs: give exactly one of json, json_object or grammar")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError("structured_outputs: json must be a JSON Schema (a dict or its JSON text)")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError("structured_outputs: grammar must be a string")
        object.__setattr__(self, "trigger_token_ids", tuple(self.trigger_token_ids))

    def grammar_text(self) -> str:
        """The llguidance grammar (its JSON form) of this constraint; raises ValueError on unparsable input."""
        from llguidance import LLMatcher

        if self.grammar is not None:
            return LLMatcher.grammar_from_lark(self.grammar)
        schema = {"type": "object"} if self.json_object else self.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be a JSON object")
        # compact separators, no free whitespace: every token makes progress (a random model cannot stall
        # in whitespace), and the text is what json.dumps(separators=(",", ":")) writes
        return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})


def check(params: StructuredOutputsParams) -> str:
    """The grammar text if valid, else ValueError with the library's reason (no tokenizer needed)."""
    from llguidance import LLMatcher

    text = params.grammar_text()
    error = LLMatcher.validate_grammar(text)
    if error:
        raise ValueError(error.strip())
    return text


class GrammarCompiler:
    """The tokenizer's view for llguidance (built on the first constrained request) and the texts of
    grammars already validated against it (LRU), so a schema many requests share is checked once."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 256, prefetch: bool = True,
                 use_kernel: bool = True):
        self.tokenizer, self.vocab_size, self.cache_size = tokenizer, vocab_size, cache_size
        self.prefetch, self.use_kernel = prefetch, use_kernel  # False, False: the reference (benchmarks)
        self._ll_tokenizer = None
        self._executor = None  # one thread computing the next masks while the model runs (made on first use)
        self._cache: OrderedDict[str, None] = OrderedDict()

    @property
    def ll_tokenizer(self):
        if self._ll_tokenizer is None:
            import llguidance

            tok = self.tokenizer
            self._ll_tokenizer = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size,
                                                        eos_token=tok.eos_token_id)
        return self._ll_tokenizer

    def compile(self, params: StructuredOutputsParams) -> str:
        """A validated grammar for this tokenizer; ValueError naming the problem otherwise."""
        from llguidance import LLMatcher

        text = params.grammar_text()
        if text in self._cache:
            self._cache.move_to_end(text)
            return text
        error = LLMatcher.validate_grammar(text, self.ll_tokenizer)
        if error:
            raise ValueError(error.strip())
        self._cache[text] = None
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return text

    def state(self, grammar: str, triggers: list[int]) -> GrammarState:
        from llguidance import LLMatcher

        matcher = LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        if self.prefetch and self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="openr2-grammar")
        return GrammarState(matcher, self.ll_tokenizer.vocab_size, self.vocab_size, triggers,
                            self.ll_tokenizer.eos_token, self._executor, self.use_kernel)


class GrammarState:
    """One sequence's grammar position over its committed tokens (see the module docstring).

    The mask of the next position is computed ahead: `prefetch()` (the engine calls it once a step's tokens are
    committed) starts it on the compiler's thread, where it runs while the next step's model forward does
    (llguidance releases the GIL); `masks` then takes it and computes only the draft positions' rows. The
    matcher is touched by one thread at a time: everything else waits for a running prefetch first."""

    def __init__(self, matcher, tokenizer_vocab_size: int, vocab_size: int, triggers: list[int], eos_token_id: int,
                 executor=None, use_kernel: bool = True):
        self.matcher, self.pending, self.eos_token_id = matcher, list(triggers), eos_token_id
        self.tokenizer_vocab_size, self.vocab_size = tokenizer_vocab_size, vocab_size
        self.executor, self.use_kernel = executor, use_kernel
        self._words = (tokenizer_vocab_size + 31) // 32
        self._bits = np.empty((1, self._words), dtype=np.int32)  # reused: one step's masks at a time
        self._ahead = None  # the submitted prefetch (a Future) of row 0

    def prefetch(self) -> None:
        """Start computing the next position's mask (no drafts) on the executor; no-op without one."""
        if self.executor is None or self.pending or self._ahead is not None or self.matcher.is_stopped():
            return
        self._ahead = self.executor.submit(self._compute_row, 0)

    def _compute_row(self, j: int) -> None:
        # llguidance writes row j in place (as llguidance.torch does, whose import loads dynamo)
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data + j * self._bits.strides[0], self._words * 4)

    def _settle(self) -> bool:
        """Wait for a running prefetch; True when row 0 of the buffer holds the current position's mask."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead.cancel():  # none, or not started (its thread had no CPU yet): compute it here
            return False
        ahead.result()
        return True

    def masks(self, drafts: list[int]) -> TokenMask | None:
        """The masks [1 + K] of the positions after drafts[:j] (engine/token_mask.TokenMask: the allowed
        tokens' bits); None when no position is constrained. A draft the grammar refuses is blocked in its
        own row (so verification rejects it); the rows after it are never reached and repeat that row. The
        mask lives in a buffer the next call reuses: it is valid for one step."""
        have_first = self._settle()
        if self.matcher.is_error():  # a parser limit hit on the way (a pathological schema): end this request
            raise RuntimeError(f"grammar: {self.matcher.get_error()}")
        n_tok, rows = self.tokenizer_vocab_size, 1 + len(drafts)
        if self._bits.shape[0] < rows:
            grown = np.empty((rows, self._words), dtype=np.int32)
            grown[0] = self._bits[0]
            self._bits = grown
        bits = self._bits[:rows]
        pending, consumed, first = list(self.pending), 0, None  # first: the first constrained row
        try:
            for j in range(rows):
                if pending:
                    bits[j] = -1  # free
                    if j < len(drafts) and drafts[j] == pending[0]:
                        pending.pop(0)
                    continue
                first = j if first is None else first
                if not (j == 0 and have_first):
                    self._compute_row(j)
                d = drafts[j] if j < len(drafts) else None
                # a refused token would put the matcher in its error state: test the mask's bit first
                if d is None or d >= n_tok or not (int(bits[j, d >> 5]) >> (d & 31)) & 1:  # numpy int32
                    bits[j + 1:] = bits[j]
                    break
                if d == self.eos_token_id:  # allowed, and it ends the grammar: llguidance cannot roll a stop back
                    bits[j + 1:] = bits[j]  # (the positions after an EOS are never used unless ignore_eos)
                    break
                if not self.matcher.consume_token(d):
                    raise RuntimeError(f"grammar: allowed token {d} refused: {self.matcher.get_error()}")
                consumed += 1
        finally:
            if consumed:
                self.matcher.rollback(consumed)
        if first is None:
            return None
        return TokenMask(bits, first, n_tok, self.use_kernel)

    def advance(self, token_id: int) -> None:
        """Commit one generated token."""
        self._settle()
        if self.pending:
            if token_id == self.pending[0]:
                self.pending.pop(0)
            return
        if self.matcher.is_stopped():  # the grammar is complete (ignore_eos goes on past its EOS)
            return
        if not self.matcher.consume_token(token_id):
            raise RuntimeError(f"grammar: token {token_id} is not allowed here: {self.matcher.get_error()}")
