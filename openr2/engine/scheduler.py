"""Continuous batching: which sequences run this step, with how many new tokens each.

Every step spends a token budget: first on running sequences (one token each when decoding, plus its
drafts when speculating; a prompt chunk when prefilling), in priority then admission order, preempting from the other end (lowest
priority, most recently admitted; their blocks freed, to be recomputed later) when blocks run out; then
on admitting waiting sequences, best priority first, each starting from the longest cached prefix of its
tokens (the memory tier's, continued from the disk tier's files when there is one: engine/disk_cache.py). Sequences join and leave between steps. Priority 0 is interactive, 1 is batch work. A sample
forked off a computed prompt (`fork`) starts from its parent's cache (BlockManager.fork).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from openr2.engine.prefix_cache import BlockManager, chain_hashes
from openr2.engine.sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 512  # tokens in one step (chunked prefill budget)


class Scheduler:
    def __init__(self, blocks: BlockManager, config: SchedulerConfig):
        self.blocks, self.config = blocks, config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        insert_by_priority(self.waiting, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.config.max_num_batched_tokens
        plan: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens + len(seq.draft_token_ids) - seq.num_computed, budget)
            del seq.draft_token_ids[max(0, seq.num_computed + n - seq.num_tokens):]  # the drafts that fit
            need = self.blocks.blocks_for(seq.num_computed + n) - len(seq.block_table)
            while need > self.blocks.num_free and self.running[-1] is not seq:
                self._preempt(self.running.pop())
                preempted = True
            if need > self.blocks.num_free:  # nothing left to take blocks from: wait for others
                self._preempt(self.running.pop(i))
                preempted = True
                break
            seq.block_table += self.blocks.allocate(max(need, 0))
            plan.append((seq, n))
            budget -= n
            i += 1
        if not preempted:  # admitting while others are being evicted would thrash
            self._admit(plan, budget)
        return plan

    def _admit(self, plan: list[tuple[Sequence, int]], budget: int) -> None:
        bs = self.blocks.block_size
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # at least one token must be computed to get logits, so never take the block holding the last one
            if len(seq.block_hashes) < (seq.num_tokens - 1) // bs:
                seq.block_hashes = chain_hashes(seq.token_ids, bs, seq.salt, (seq.num_tokens - 1) // bs)
            hashes = seq.block_hashes[: (seq.num_tokens - 1) // bs]
            hits = self.blocks.lookup(hashes)
            if len(hits) < len(hashes) and self.blocks.disk is not None:
                hits += self.blocks.load(hashes[len(hits) :], hits, self._loadable(seq, hashes, hits, budget))
            cached = len(hits) * bs
            n = min(seq.num_tokens - cached, budget)
            new = self.blocks.blocks_for(cached + n) - len(hits)
            if self.blocks.cost(hits, new) > self.blocks.num_free:
                break
            self.blocks.acquire(hits)
            seq.block_table = hits + self.blocks.allocate(new)
            seq.num_computed, seq.num_registered = cached, len(hits)
            if not seq.admitted:
                seq.num_cached_prompt_tokens = min(cached, seq.num_prompt_tokens)
                seq.admitted = True
            seq.status = Status.RUNNING
            self.waiting.popleft()
            insert_by_priority(self.running, seq)
            plan.append((seq, n))
            budget -= n

    def _loadable(self, seq: Sequence, hashes: list, hits: list[int], budget: int) -> int:
        """How many blocks past the memory tier's hits the disk tier may load for `seq`: all of its prefix if
        they fit beside the blocks of this step's chunk after them; else what leaves room for a whole chunk."""
        bs, free = self.blocks.block_size, self.blocks.num_free - self.blocks.cost(hits, 0)
        end = len(hashes) * bs
        if len(hashes) - len(hits) + self.blocks.blocks_for(end + min(seq.num_tokens - end, budget)) - len(hashes) \
                <= free:
            return len(hashes) - len(hits)
        return free - self.blocks.blocks_for(min(budget, seq.num_tokens)) - 1

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start `child` (a copy of the parent's tokens) from the parent's cache: full blocks shared, the
        partial last block copied, running beside the parent; without a free block for the copy it waits
        and is recomputed later, reusing the cached full blocks."""
        child.num_cached_prompt_tokens, child.admitted = parent.num_cached_prompt_tokens, True
        child.block_hashes = list(parent.block_hashes)
        table = self.blocks.fork(parent.block_table, parent.num_computed)
        if table is None:
            self.add(child)
            return
        child.block_table = table
        child.num_computed, child.num_registered = parent.num_computed, parent.num_registered
        child.cache_state = parent.cache_state
        child.status = Status.RUNNING
        insert_by_priority(self.running, child)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        seq.reset_for_recompute()
        insert_by_priority(self.waiting, seq, first=True)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks (cached ones stay findable)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        seq.block_table, seq.cache_state = [], None
        seq.status = Status.FINISHED

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for the first num_tokens positions of a running sequence (its next step's drafts), if free."""
        need = self.blocks.blocks_for(num_tokens) - len(seq.block_table)
        if need > self.blocks.num_free:
            return False
        seq.block_table += self.blocks.allocate(max(need, 0))
        return True

    def trim(self, seq: Sequence) -> None:
        """Roll back: free the blocks past the sequence's tokens and drafts (rejected drafts' slots)."""
        keep = self.blocks.blocks_for(seq.num_tokens + len(seq.draft_token_ids))
        if len(seq.block_table) > keep:
            self.blocks.release(seq.block_table[keep:])
            del seq.block_table[keep:]

    def register_full_blocks(self, seq: Sequence) -> None:
        """Offer each block that became full of computed tokens to the prefix cache."""
        bs = self.blocks.block_size
        full = seq.num_computed // bs
        if full > len(seq.block_hashes):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes += chain_hashes(seq.token_ids, bs, seq.salt, full, parent, len(seq.block_hashes))
        for i in range(seq.num_registered, full):
            self.blocks.register(seq.block_table[i], seq.block_hashes[i])
        if full > seq.num_registered:  # the disk tier writes them through (asynchronously)
            self.blocks.spill(seq.block_table[seq.num_registered : full], seq.block_hashes[seq.num_registered : full])
        seq.num_registered = max(seq.num_registered, full)


def insert_by_priority(queue, seq: Sequence, first: bool = False) -> None:
    """Insert after every sequence of the same or better priority (before them with first=True)."""
    i = len(queue)
    while i > 0 and (queue[i - 1].priority > seq.priority or first and queue[i - 1].priority == seq.priority):
        i -= 1
    queue.insert(i, seq)
