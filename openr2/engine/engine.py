"""LLMEngine: requests in, streamed outputs with token counts out. The LLM facade is in llm.py.

The engine owns requests: it validates them, hands sequences to the scheduler, asks the runner for
logits, samples, detokenises incrementally, applies stop conditions, forks n samples off a shared prompt
and reports usage (prompt, cached prompt, completion and reasoning tokens) with each finished request.

A failure in one request's own work (forking, sampling its rows, appending its token) ends only that
request: its output comes back finished with `error` set and the others go on. A failure of the step as a
whole (scheduling, the model forward) raises from step(): it cannot be pinned on one request.

    engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_bytes=64 << 20))
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from openr2.engine.compiled import COMPILED_DECODE_MAX_TOKENS
from openr2.engine.grammar import GrammarCompiler
from openr2.engine.kv_cache import KVPool
from openr2.engine.prefix_cache import BlockManager
from openr2.engine.rejection import sample_with_drafts
from openr2.engine.runner import ModelRunner
from openr2.engine.sampling import SamplingParams, TokenSample, make_generator, max_tokens_for
from openr2.engine.scheduler import Scheduler, SchedulerConfig
from openr2.engine.sequence import Sequence
from openr2.engine.speculative import SpecStats, SpeculativeConfig, Speculator
from openr2.engine.stop import StopChecker
from openr2.engine.usage import Usage
from openr2.engine.v4_cache import V4Pool
from openr2.model.transformer import Transformer


@dataclass
class EngineConfig:
    block_size: int | None = None  # tokens per block; default 64, DeepSeek-V4 V4Pool.default_block_size's
    kv_cache_bytes: int = 256 << 20  # memory budget of the latent cache pool
    num_blocks: int | None = None  # exact pool size; overrides kv_cache_bytes
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per-step token budget: prompt chunks beyond it continue next step
    max_model_len: int | None = None  # prompt + output; default max_position_embeddings
    enable_prefix_caching: bool = True
    # the disk tier of prefix caching (engine/disk_cache.py): complete blocks written here, loaded after a restart
    cache_dir: str | None = None
    cache_dir_bytes: int = 16 << 30  # the disk tier's size cap (least recently used block files go first)
    compile: bool = False  # compile the decode step (engine/compiled.py): minutes once, then faster decode
    compile_cache_dir: str | None = None  # compiled steps kept here; default $OPENR2_CACHE_DIR or ~/.cache/openr2
    # vLLM's: {"method": "mtp" | "ngram", "num_speculative_tokens": k, ...} (engine/speculative.py) or "mtp:2"
    speculative_config: dict | str | None = None
    # DeepSeek-V3.2: the indexer keys' dtype in the cache ("bfloat16": half their bytes, scanned with AMX tiles
    # where the CPU has them; scores from bf16-rounded keys and queries); None: the model's dtype
    index_cache_dtype: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list | None = None  # per token: TokenSample(token_id, logprob, top)
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None
    text_delta: str = ""  # what this step added (streaming)
    token_ids_delta: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _index_cache_dtype(name: str | None, config) -> torch.dtype | None:
    """EngineConfig.index_cache_dtype as a dtype (None: the model's); only a model with an indexer takes one."""
    if name is None:
        return None
    if name not in ("bfloat16", "float32"):
        raise ValueError(f"index_cache_dtype {name!r}: expected bfloat16 or float32")
    if config.is_v4 or not config.has_indexer:
        raise ValueError("index_cache_dtype applies to DeepSeek-V3.2 models (indexer keys in the cache); "
                         f"this one is {config.model_type}")
    return getattr(torch, name)


class RequestError(RuntimeError):
    """One request failed inside the engine (its __cause__ says why); the other requests went on."""


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    usage: Usage  # reasoning_tokens is filled in when the request finishes
    error: Exception | None = None  # why the engine ended this request (finish_reason "abort"); None if fine

    @property
    def num_cached_tokens(self) -> int:  # vLLM's name
        return self.usage.cached_prompt_tokens


class _Request:
    """One request: its sequences (one until the prompt is done, then n) and the text state of each sample."""

    def __init__(self, request_id, prompt, prompt_ids, params, max_tokens, salt, priority, tokenizer,
                 starts_in_reasoning):
        self.request_id, self.prompt, self.prompt_ids = request_id, prompt, prompt_ids
        self.params, self.max_tokens, self.salt, self.priority = params, max_tokens, salt, priority
        self.seqs: list[Sequence] = []
        self.outputs = [CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None)
                        for i in range(params.n)]
        self.decoders = [_make_decoder(tokenizer, prompt_ids, params) for _ in range(params.n)]
        self.stops = [StopChecker(params.stop, params.include_stop_str_in_output) for _ in range(params.n)]
        self.starts_in_reasoning = starts_in_reasoning
        self.forked = params.n == 1
        self.grammar: str | None = None  # the compiled constraint of params.structured_outputs
        self.triggers: list[int] = []  # tokens generated freely before the constraint starts

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


def _make_decoder(tokenizer, prompt_ids, params):
    if tokenizer is None:
        return None
    from openr2.tokenizer import StreamDecoder

    return StreamDecoder(tokenizer, skip_special_tokens=params.skip_special_tokens)


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config = config or EngineConfig()
        mconf = model.config
        self.max_model_len = min(config.max_model_len or mconf.max_position_embeddings,
                                 mconf.max_position_embeddings)
        speculative = SpeculativeConfig.parse(config.speculative_config)
        num_layers = mconf.num_hidden_layers
        if speculative is not None and speculative.method == "mtp":
            if not len(model.mtp):
                raise ValueError("speculative_config: method 'mtp' needs a checkpoint with MTP modules "
                                 "(num_nextn_predict_layers >= 1); use 'ngram' for this one")
            num_layers += len(model.mtp)  # the MTP layers' own caches
        if mconf.is_v4 and speculative is not None:
            raise ValueError("speculative decoding is not supported for DeepSeek-V4 yet (its paged cache cannot "
                             "roll back rejected drafts' compressor state)")
        pool_cls = V4Pool if mconf.is_v4 else KVPool
        index_dtype = _index_cache_dtype(config.index_cache_dtype, mconf)  # refused for models without one
        extra = {} if index_dtype is None else {"index_dtype": index_dtype}
        block_size = config.block_size or (V4Pool.default_block_size(mconf) if mconf.is_v4 else 64)
        if config.num_blocks is not None:
            self.pool = pool_cls(mconf, config.num_blocks, block_size, model.dtype, model.device, num_layers,
                                 **extra)
        else:
            running = {"max_num_seqs": config.max_num_seqs} if mconf.is_v4 else extra  # V4: compressor states
            self.pool = pool_cls.from_budget(mconf, config.kv_cache_bytes, block_size, model.dtype,
                                             model.device, num_layers, **running)
        disk = None
        if config.cache_dir is not None:
            if not config.enable_prefix_caching:
                raise ValueError("cache_dir: the disk tier of prefix caching needs enable_prefix_caching")
            from openr2.engine.disk_cache import DiskTier

            disk = DiskTier.open(self.pool, model, config.cache_dir, config.cache_dir_bytes)
        self.blocks = BlockManager(self.pool.num_blocks, block_size, config.enable_prefix_caching,
                                   self.pool.copy_block, disk)
        self.scheduler = Scheduler(self.blocks, SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens))
        self.runner = ModelRunner(model, self.pool, config.compile, config.compile_cache_dir)
        self.speculator = Speculator(speculative, self.runner, self.scheduler, len(model.mtp)) \
            if speculative is not None else None
        self.spec_stats = SpecStats()
        # the policy rates steps in this process's CPU seconds on CPU (SpecPolicy); a GPU's work is not in them
        self._step_clock = time.process_time if model.device.type == "cpu" else time.perf_counter
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if self.eos_token_id is None:
            eos = mconf.eos_token_id
            self.eos_token_id = eos[0] if isinstance(eos, list) else eos
        self.think_ids = _think_ids(tokenizer)
        self.grammars = GrammarCompiler(tokenizer, mconf.vocab_size) if tokenizer is not None else None

    @classmethod
    def from_pretrained(cls, path: str, config: EngineConfig | None = None, dtype=torch.float32,
                        device="cpu") -> LLMEngine:
        import os

        from openr2.checkpoints import load_model

        tokenizer = None
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            from openr2.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_pretrained(path)
        return cls(load_model(path, dtype=dtype, device=device), tokenizer, config)

    # ------------------------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | list[int] | dict,
                    params: SamplingParams | None = None, salt: str | None = None, priority: int = 0) -> None:
        """Queue a prompt (text, token ids, or {"prompt_token_ids": [...]}); salt scopes the prefix cache;
        priority 0 is interactive, higher values (batch work) yield to it."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self._prompt_ids(prompt)
        max_tokens = max_tokens_for(params.max_tokens, self.max_model_len, len(ids), default=None)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens do not fit the context window of {self.max_model_len} "
                             f"(a completion needs at least one more)")
        if self.blocks.blocks_for(min(len(ids) + max_tokens, self.max_model_len)) > self.pool.num_blocks:
            raise ValueError(f"prompt: {len(ids)} + max_tokens {max_tokens} tokens exceed the KV cache pool "
                             f"({self.pool.num_blocks} blocks of {self.pool.block_size})")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt_token_ids: ids must be in [0, {vocab})")
        req = _Request(request_id, text, ids, params, max_tokens, salt, priority, self.tokenizer,
                       self._starts_in_reasoning(ids))
        if params.structured_outputs is not None:
            self._constrain(req)
        seq = self._new_seq(req, 0, list(ids))
        self.requests[request_id] = req
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its blocks are freed (cached full blocks stay findable)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
        for out in req.outputs:
            if not out.finished:
                out.finish_reason = "abort"
        return self._output(req)

    def reset_prefix_cache(self) -> None:
        """Drop all cached prefixes (vLLM's name): call it after updating the model's weights in place (the disk
        tier then keys this model's blocks by its new weights)."""
        self.blocks.reset()
        if self.blocks.disk is not None:
            from openr2.engine.disk_cache import model_fingerprint

            self.blocks.disk.cache.set_fingerprint(model_fingerprint(self.model))

    def flush_cache(self) -> None:
        """Wait until the blocks queued for the disk tier (cache_dir) are written; nothing without one."""
        if self.blocks.disk is not None:
            self.blocks.disk.cache.flush()

    def warm_up(self) -> None:
        """Run the decode shapes a server meets (one row, several rows) once on an idle engine, so that
        compilation (EngineConfig.compile) happens now, or its packages are loaded from disk, rather than
        inside the first requests: batches of 1, 2, ... rows until every compiled batch size is covered. With
        speculative decoding, also every width of a step with drafts, and the MTP's draft steps."""
        if self.requests:
            raise RuntimeError("warm_up needs an idle engine")
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        max_rows = min(COMPILED_DECODE_MAX_TOKENS, self.config.max_num_seqs, self.pool.num_blocks)
        max_drafts = self.runner.max_drafts(1)
        if self.speculator is not None and max_drafts is not None:  # a step k + 1 tokens wide, for each k
            self.runner.prepare(self.speculator.compiled_shapes(max_drafts), max_rows)
        rows = 1
        while rows is not None:
            for i in range(rows):
                self.add_request(f"warm-up-{rows}-{i}", [0, 0, 0], params)
            while self.has_unfinished_requests():
                self.step()
            more = self.runner.uncompiled_rows(max_rows)
            rows = more if more is not None and more > rows else None  # a batch that did not cover: stop
        self.blocks.reset()  # the warm-up's blocks must not look like anyone's cached prefix (none is a full block)
        self.runner.prune_compiled()  # the packages it loaded or built are the ones kept

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        """Sequences in the running batch (a request with n samples counts n once forked)."""
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        """Sequences queued for admission (new, or preempted to be recomputed)."""
        return self.scheduler.num_waiting

    # ------------------------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; returns an output for every request that changed."""
        for req in self.requests.values():
            for out in req.outputs:
                out.text_delta, out.token_ids_delta = "", []
        plan = self.scheduler.schedule()
        if not plan:
            if self.scheduler.has_work():
                raise RuntimeError("no sequence could be scheduled: the KV cache pool is too small")
            return []
        start_s = self._step_clock()
        prefilling = {seq.seq_id for seq, _ in plan if seq.num_tokens - seq.num_computed > 1}
        self._num_committed = 0
        out = self.runner.run(plan, with_hidden=self.speculator is not None and self.speculator.mtp is not None)
        starts, ready = {}, []
        for seq, n in plan:
            starts[seq.seq_id] = seq.num_computed
            seq.num_computed += n - len(seq.draft_token_ids)  # drafts count once verified
            self.scheduler.register_full_blocks(seq)
            if seq.seq_id in out.logits:
                ready.append(seq)
        touched, failed = {}, {}
        if ready:
            self._sample(ready, out.logits, touched, failed, out.argmax)
        if self.speculator is not None:
            verified_k = self.speculator.k
            self.speculator.propose([(seq, self._room(seq)) for seq, _ in plan if not seq.is_finished
                                     and seq.request_id not in failed and seq.request_id in self.requests],
                                    starts, out, prefilling)
            if not prefilling:  # the policy learns from decode steps only (a prompt chunk would skew the rate)
                # the step's time includes drafting for the next one: steadily, the same k's cost
                self.speculator.policy.record(len(plan), verified_k, self._num_committed,
                                              self._step_clock() - start_s)
        for request_id in failed:  # one of its samples may have got a token before another failed
            touched.pop(request_id, None)
        finished = []
        for req in touched.values():
            if req.finished:
                finished.append(req.request_id)
        outputs = [self._output(req) for req in touched.values()]
        for request_id in finished:
            del self.requests[request_id]
        for request_id, error in failed.items():
            out = self.abort(request_id)
            out.error = error
            outputs.append(out)
        return outputs

    def stream(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
               salt: str | None = None) -> Iterator[RequestOutput]:
        """Add a request and drive the engine until it finishes, yielding its output after each change."""
        request_id = request_id or f"stream-{next(self._seq_ids)}"
        self.add_request(request_id, prompt, params, salt)
        try:
            while request_id in self.requests:
                for out in self.step():
                    if out.request_id == request_id:
                        if out.error is not None:
                            raise RequestError(f"request {request_id} failed") from out.error
                        yield out
        finally:  # a consumer that stops listening must not leave its request holding blocks
            self.abort(request_id)

    # ------------------------------------------------------------------------------------ internals
    def _new_seq(self, req: _Request, index: int, token_ids: list[int]) -> Sequence:
        p = req.params
        seq = Sequence(next(self._seq_ids), req.request_id, index, token_ids, len(req.prompt_ids), p,
                       make_generator(p.seed, self.model.device, index), req.salt, req.priority)
        if req.grammar is not None:  # forks happen before any token is committed: a fresh state is theirs
            seq.grammar = self.grammars.state(req.grammar, req.triggers)
        req.seqs.append(seq)
        return seq

    def _constrain(self, req: _Request) -> None:
        """Compile the request's grammar (ValueError when it has none that works with this tokenizer); the
        answer is constrained after the reasoning its prompt opens (</think>) and the request's own triggers."""
        if self.grammars is None:
            raise ValueError("structured_outputs: constrained decoding needs the model's tokenizer")
        spec = req.params.structured_outputs
        try:
            req.grammar = self.grammars.compile(spec)
        except ValueError as e:
            raise ValueError(f"structured_outputs: {e}") from None
        req.triggers = ([self.think_ids[1]] if req.starts_in_reasoning else []) + list(spec.trigger_token_ids)

    def _sample(self, ready: list[Sequence], logits: dict[int, torch.Tensor], touched: dict, failed: dict,
                argmax: dict[int, list[int]] | None = None) -> None:
        """Verify drafts and sample for every ready row, appending the committed tokens; a request whose own
        work raises goes to `failed` (request_id -> the exception) and gets no token this step. argmax: the
        runner's argmax tokens of rows' logits (StepOutput.argmax), where it has them."""
        rows = []  # (sequence, its logits rows [1 + drafts, V], their grammar masks or None)
        for seq in ready:
            req = self.requests[seq.request_id]
            try:  # a request with n > 1 samples its n first tokens from the one prompt pass, then forks
                group = self._fork(req, seq) if not req.forked else [seq]
                # each position's grammar mask (the sampled one and each draft's); None: a free row
                masks = [s.grammar.masks(s.draft_token_ids) if s.grammar is not None else None for s in group]
            except Exception as e:
                failed[req.request_id] = e
                continue
            rows += [(s, logits[seq.seq_id], m) for s, m in zip(group, masks)]
        if not rows:
            return
        # plain greedy rows (no penalties, logprobs or grammar) take the argmax: sample_with_drafts' own choice
        plain = [i for i, (s, _, m) in enumerate(rows) if m is None and s.params.greedy
                 and not s.params.has_penalties and s.params.logprobs is None]
        tokens = [None] * len(rows)
        if plain:
            argmax = argmax or {}
            todo = [i for i in plain if rows[i][0].seq_id not in argmax]
            if todo:
                found = torch.cat([rows[i][1] for i in todo]).argmax(-1).tolist()
                for i in todo:
                    argmax[rows[i][0].seq_id], found = found[: rows[i][1].shape[0]], found[rows[i][1].shape[0] :]
            for i in plain:
                tokens[i] = _greedy_commit(rows[i][0].draft_token_ids, argmax[rows[i][0].seq_id])
        others = [i for i in range(len(rows)) if tokens[i] is None]
        if others:
            for i, t in zip(others, self._sample_others([rows[i] for i in others], failed)):
                tokens[i] = t
        for (seq, *_), committed in zip(rows, tokens):
            if seq.request_id in failed:
                continue
            req = self.requests[seq.request_id]
            try:
                self._commit(req, seq, committed)
            except Exception as e:
                failed[req.request_id] = e
                continue
            touched[req.request_id] = req

    @staticmethod
    def _sample_others(rows: list, failed: dict) -> list:
        """_sample_rows over rows; a row that breaks the batch is found by sampling each alone (its request
        goes to `failed`, its tokens are None)."""
        try:
            tokens = _sample_rows(rows)
        except Exception:  # some row broke the batch: sample each alone to find whose request it was
            tokens = []
            for row in rows:
                try:
                    tokens += _sample_rows([row])
                except Exception as e:
                    failed[row[0].request_id] = e
                    tokens.append(None)
        return tokens

    def _commit(self, req: _Request, seq: Sequence, tokens: list) -> None:
        """The verified tokens: its accepted drafts (whose cache entries become committed) and one sampled."""
        num_drafts = len(seq.draft_token_ids)
        if num_drafts:
            self.spec_stats.num_drafts += 1
            self.spec_stats.num_draft_tokens += num_drafts
            self.spec_stats.num_accepted_tokens += len(tokens) - 1
            seq.num_computed += len(tokens) - 1
            seq.draft_token_ids = []
        for token in tokens:
            self._append(req, seq, token)
            self._num_committed += 1
            if seq.is_finished:
                return
        if num_drafts:
            self.scheduler.register_full_blocks(seq)
        if seq.grammar is not None:  # the next position's mask, computed while the next forward runs
            seq.grammar.prefetch()

    def _room(self, seq: Sequence) -> int:
        """The most drafts a sequence's limits leave room for (max_tokens, the context window)."""
        req = self.requests[seq.request_id]
        return min(req.max_tokens - seq.num_output_tokens - 1, self.max_model_len - seq.num_tokens)

    def _fork(self, req: _Request, parent: Sequence) -> list[Sequence]:
        """The request's other samples start from its prompt pass (the scheduler shares or copies blocks)."""
        req.forked = True
        children = [parent]
        for i in range(1, req.params.n):
            child = self._new_seq(req, i, list(parent.token_ids))
            self.scheduler.fork(parent, child)
            children.append(child)
        return children

    def _append(self, req: _Request, seq: Sequence, token) -> None:
        out = req.outputs[seq.index]
        p = req.params
        if seq.grammar is not None:
            seq.grammar.advance(token.token_id)
        seq.token_ids.append(token.token_id)
        out.token_ids.append(token.token_id)
        out.token_ids_delta.append(token.token_id)
        if token.logprob is not None:
            seq.cumulative_logprob += token.logprob
            out.cumulative_logprob = seq.cumulative_logprob
            if out.logprobs is not None:
                out.logprobs.append(token)
        reason, stop_reason = None, None
        is_eos = token.token_id == self.eos_token_id and not p.ignore_eos
        if is_eos:
            reason = "stop"
        elif token.token_id in p.stop_token_ids:
            reason, stop_reason = "stop", token.token_id
        decoder, stopper = req.decoders[seq.index], req.stops[seq.index]
        if decoder is not None and not is_eos and stop_reason is None:
            text, stopped = stopper.feed(decoder.add(token.token_id))
            self._emit(out, text)
            if stopped:
                reason, stop_reason = "stop", stopper.matched
        if reason is None and (seq.num_output_tokens >= req.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if decoder is not None and stopper.matched is None:  # release held-back text
                self._emit(out, stopper.feed(decoder.flush())[0] + stopper.flush())
            out.finish_reason, out.stop_reason = reason, stop_reason
            self.scheduler.finish(seq)

    @staticmethod
    def _emit(out: CompletionOutput, text: str) -> None:
        out.text += text
        out.text_delta += text

    def _output(self, req: _Request) -> RequestOutput:
        """A snapshot: later steps do not change it (token_ids lists keep growing until finished)."""
        completion = sum(len(o.token_ids) for o in req.outputs)
        # reasoning is counted once, at the end: scanning every step would be quadratic in the length
        reasoning = sum(self._reasoning_tokens(req, o.token_ids) for o in req.outputs) if req.finished else 0
        cached = req.seqs[0].num_cached_prompt_tokens if req.seqs else 0
        usage = Usage(len(req.prompt_ids), cached, completion, reasoning)
        outputs = [dataclasses.replace(o) for o in req.outputs]
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outputs, req.finished, usage)

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError("prompt: a dict prompt needs 'prompt_token_ids'")
            ids = prompt["prompt_token_ids"]
            text = prompt.get("prompt")
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer; pass token ids instead")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, prompt
        if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(t, int) for t in ids):
            raise ValueError("prompt: expected a non-empty list of token ids")
        return text, list(ids)

    def _starts_in_reasoning(self, ids: list[int]) -> bool:
        """The prompt ends inside an open <think> block (R1 templates end with '<think>\\n')."""
        start, end = self.think_ids
        if start is None:
            return False
        last_start = max((i for i, t in enumerate(ids) if t == start), default=-1)
        last_end = max((i for i, t in enumerate(ids) if t == end), default=-1)
        return last_start > last_end

    def _reasoning_tokens(self, req: _Request, token_ids: list[int]) -> int:
        start, end = self.think_ids
        if start is None:
            return 0
        from openr2.chat_format import count_reasoning_tokens

        return count_reasoning_tokens(token_ids, end, req.starts_in_reasoning, start)


def _greedy_commit(drafts: list[int], argmax: list[int]) -> list[TokenSample]:
    """A plain greedy row's committed tokens from the argmax token at each of its positions: the drafts that
    equal the argmax before them, then the argmax after the last accepted one (sample_with_drafts' greedy rule)."""
    a = next((j for j, t in enumerate(drafts) if argmax[j] != t), len(drafts))
    return [TokenSample(t, None, None) for t in drafts[:a]] + [TokenSample(argmax[a], None, None)]


def _sample_rows(rows: list[tuple[Sequence, torch.Tensor, torch.Tensor | None]]) -> list[list]:
    """The committed tokens (TokenSamples) of each (sequence, logits rows [1 + drafts, V], grammar masks of
    those rows or None), each with its sequence's params and generator: its accepted drafts, then one
    sampled token."""
    seqs = [s for s, *_ in rows]
    history = [s.params.has_penalties for s in seqs]  # token histories are read only for penalties
    masks = [m for *_, m in rows]
    return sample_with_drafts(
        torch.cat([row for _, row, _ in rows]), [s.draft_token_ids for s in seqs], [s.params for s in seqs],
        [s.generator for s in seqs], [s.token_ids[: s.num_prompt_tokens] if h else None for s, h in zip(seqs, history)],
        [s.output_token_ids if h else None for s, h in zip(seqs, history)],
        blocked=masks if any(m is not None for m in masks) else None, scratch=True)  # torch.cat made it: ours


def _think_ids(tokenizer) -> tuple[int | None, int | None]:
    if tokenizer is None:
        return None, None
    from openr2.tokenizer import THINK_END, THINK_START

    return tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END)
