"""Block manager with prefix caching: allocation, reference counts, hash-chained reuse, LRU eviction.

A full block of tokens is identified by a hash chained over everything before it (so equal blocks at
different prefixes never collide) and seeded by an optional tenant salt (so one tenant's cached context
never serves another). Blocks whose reference count drops to zero keep their contents and stay findable
until the pool needs them back, oldest first (LRU). Partial blocks are never shared: a fork (n samples
of one prompt) shares the full blocks and copies the partial last one (`fork`, copy-on-write through the
pool's `copy_block`).

With a disk tier (engine/disk_cache.py, `cache_dir`), every block offered to the cache is also written to disk
(`spill`), and a lookup that misses in memory goes on from the files (`load`): blocks read into the pool and
registered as if they had been computed here.
"""

from __future__ import annotations

import array
import hashlib
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openr2.engine.disk_cache import DiskTier


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """blake2b-128 of the parent hash and the tokens as 4-byte little-endian unsigned integers."""
    data = array.array("I", tokens)  # 4 bytes each (asserted below); an id >= 2**32 or < 0 raises OverflowError
    if sys.byteorder != "little":
        data.byteswap()
    return hashlib.blake2b(parent + data.tobytes(), digest_size=16).digest()


assert array.array("I").itemsize == 4, "block hashes take token ids as 4-byte integers"


def root_hash(salt: str | None) -> bytes:
    """The chain's starting point: a tenant's salt scopes every hash after it."""
    return hashlib.blake2b(("openr2:" + (salt or "")).encode(), digest_size=16).digest()


def chain_hashes(token_ids: Sequence[int], block_size: int, salt: str | None, num_blocks: int | None = None,
                 parent: bytes | None = None, start_block: int = 0) -> list[bytes]:
    """Hashes of the full blocks start_block.. of token_ids (parent = hash of block start_block - 1)."""
    full = len(token_ids) // block_size if num_blocks is None else min(num_blocks, len(token_ids) // block_size)
    h = parent if parent is not None else root_hash(salt)
    out = []
    for i in range(start_block, full):
        h = block_hash(h, token_ids[i * block_size : (i + 1) * block_size])
        out.append(h)
    return out


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 copy_block: Callable[[int, int, int], None] | None = None, disk: DiskTier | None = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.copy_block = copy_block  # (src, dst, num_tokens): copies cached contents (KVPool.copy_block)
        self.caching = enable_prefix_caching
        if disk is not None and not enable_prefix_caching:
            raise ValueError("cache_dir: the disk tier of prefix caching needs enable_prefix_caching")
        self.disk = disk  # the disk tier (engine/disk_cache.py): complete blocks written through, loaded on a miss
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.block_of: dict[bytes, int] = {}
        self.free: deque[int] = deque(range(num_blocks))  # empty blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, oldest first

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def fork(self, table: list[int], num_tokens: int) -> list[int] | None:
        """A second owner's block table for the first num_tokens tokens of `table`: the full blocks shared
        (one more reference each), the partial last block copied into a new block; None when no block is
        free for that copy (the caller then recomputes, reusing the cached full blocks)."""
        full, partial = divmod(num_tokens, self.block_size)
        if partial and self.num_free == 0:
            return None
        shared = table[:full]
        self.acquire(shared)  # before allocating, so that eviction cannot take them
        out = list(shared)
        if partial:
            (block,) = self.allocate(1)
            self.copy_block(table[full], block, partial)
            out.append(block)
        return out

    # -------------------------------------------------------------------------------- prefix lookup
    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks matching the longest prefix of `hashes` (no references taken)."""
        hits = []
        if self.caching:
            for h in hashes:
                block = self.block_of.get(h)
                if block is None:
                    break
                hits.append(block)
        return hits

    def load(self, hashes: list[bytes], hits: list[int], max_blocks: int) -> list[int]:
        """Continue the memory tier's `hits` through the disk tier: the blocks of the longest prefix of `hashes`
        (at most max_blocks) found in memory or on disk, those on disk read into free (or least recently used)
        blocks and registered; all left unreferenced like any cached block. `hits` are kept from eviction
        meanwhile."""
        out: list[int] = []
        if self.disk is None or not self.caching or max_blocks <= 0:
            return out
        hashes = hashes[:max_blocks]
        self.acquire(hits)
        try:
            while len(out) < len(hashes):
                block = self.block_of.get(hashes[len(out)])
                if block is not None:  # past a block evicted from memory, the chain may go on in memory
                    self.acquire([block])
                    out.append(block)
                    continue
                want = []
                for h in hashes[len(out) :]:
                    if h in self.block_of or len(want) == self.disk.LOAD_BATCH:
                        break
                    want.append(h)
                n, tensors = self.disk.read(want[: self.num_free])
                if not n:
                    break
                blocks = self.allocate(n)  # referenced: later allocations cannot take them
                self.disk.load(blocks, tensors)
                for b, h in zip(blocks, want):
                    self.block_of[h], self.hash_of[b] = b, h
                out += blocks
                if n < len(want):
                    break
        finally:
            self.release(hits + out)
        return out

    def spill(self, blocks: list[int], hashes: list[bytes]) -> None:
        """Offer just-completed blocks to the disk tier (written asynchronously, those not there already)."""
        if self.disk is not None and self.caching and blocks:
            self.disk.spill(blocks, hashes)

    def cost(self, hits: list[int], num_new: int) -> int:
        """Free blocks consumed by taking `hits` (those now evictable leave the free count) plus num_new."""
        return num_new + sum(1 for b in hits if self.ref_count[b] == 0)

    # -------------------------------------------------------------------------------- references
    def acquire(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.ref_count[b] == 0:
                self.evictable.pop(b, None)
            self.ref_count[b] += 1

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} blocks with {self.num_free} free")  # callers check first
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.popleft()
            else:  # reuse the least recently used cached block
                b, _ = self.evictable.popitem(last=False)
                del self.block_of[self.hash_of[b]]
                self.hash_of[b] = None
            self.ref_count[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):  # a sequence's tail blocks are evicted before its head blocks
            self.ref_count[b] -= 1
            assert self.ref_count[b] >= 0, f"block {b} released twice"
            if self.ref_count[b] == 0:
                if self.hash_of[b] is not None:
                    self.evictable[b] = None
                else:
                    self.free.append(b)

    def reset(self) -> None:
        """Forget every cached prefix (after the weights change, cached K/V is stale): unreferenced cached
        blocks become free, blocks in use stay with their sequences but can no longer be hit."""
        for b in self.evictable:
            self.free.append(b)
        self.evictable.clear()
        self.block_of.clear()
        self.hash_of = [None] * self.num_blocks

    def register(self, block: int, h: bytes) -> None:
        """Make a just-filled block findable by its hash (first writer wins for duplicates)."""
        if self.caching and self.hash_of[block] is None and h not in self.block_of:
            self.block_of[h] = block
            self.hash_of[block] = h
