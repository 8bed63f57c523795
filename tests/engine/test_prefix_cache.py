"""Block manager: allocation, reference counts, hash-chained prefix reuse, tenant salt, LRU eviction."""

from __future__ import annotations

import pytest

from openr2.engine.prefix_cache import BlockManager, chain_hashes

BS = 4


def _filled(manager: BlockManager, tokens: list[int], salt=None) -> list[int]:
    """Allocate blocks for tokens and register the full ones, as the engine does after computing them."""
    blocks = manager.allocate(manager.blocks_for(len(tokens)))
    for block, h in zip(blocks, chain_hashes(tokens, BS, salt)):
        manager.register(block, h)
    return blocks


def test_hashes_chain_over_the_whole_prefix():
    a = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS, None)
    b = chain_hashes([9, 9, 9, 9, 5, 6, 7, 8], BS, None)
    assert len(a) == 2 and a[1] != b[1]  # same second block, different prefix
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7], BS, None) == a[:1]  # partial blocks have no hash
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS, "tenant-a") != a
    # resuming a chain from its last hash gives the same result as hashing from the start
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS, None, parent=a[0], start_block=1) == a[1:]


def test_reuse_refcounts_and_release():
    m = BlockManager(num_blocks=6, block_size=BS)
    tokens = list(range(10))
    first = _filled(m, tokens)
    hits = m.lookup(chain_hashes(tokens, BS, None))
    assert hits == first[:2]
    m.acquire(hits)
    assert [m.ref_count[b] for b in first] == [2, 2, 1]
    m.release(first)
    assert m.num_free == 4  # the partial block went back; full ones are still referenced by the second user
    m.release(hits)
    assert m.num_free == 6 and m.lookup(chain_hashes(tokens, BS, None)) == first[:2]  # cached while unreferenced


def test_tenant_salt_never_shares():
    m = BlockManager(num_blocks=4, block_size=BS)
    tokens = list(range(8))
    _filled(m, tokens, salt="alice")
    assert m.lookup(chain_hashes(tokens, BS, "bob")) == []
    assert m.lookup(chain_hashes(tokens, BS, None)) == []
    assert len(m.lookup(chain_hashes(tokens, BS, "alice"))) == 2


def test_lru_eviction_takes_oldest_unreferenced_first():
    m = BlockManager(num_blocks=4, block_size=BS)
    old = list(range(100, 108))
    new = list(range(200, 208))
    old_blocks = _filled(m, old)
    m.release(old_blocks)
    new_blocks = _filled(m, new)
    m.release(new_blocks)
    m.allocate(2)  # evicts the two least recently released blocks: the old prefix
    assert m.lookup(chain_hashes(old, BS, None)) == []
    assert m.lookup(chain_hashes(new, BS, None)) == new_blocks
    # a hit on an unreferenced cached block costs a free block
    assert m.cost(new_blocks, 0) == 2 and m.num_free == 2


def test_allocation_beyond_pool_and_double_release():
    m = BlockManager(num_blocks=2, block_size=BS)
    blocks = m.allocate(2)
    with pytest.raises(RuntimeError):
        m.allocate(1)
    m.release(blocks)
    with pytest.raises(AssertionError):
        m.release(blocks)


def test_caching_off_never_hits():
    m = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    tokens = list(range(8))
    _filled(m, tokens)
    assert m.lookup(chain_hashes(tokens, BS, None)) == []


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    copies = []
    m = BlockManager(num_blocks=4, block_size=BS, copy_block=lambda *args: copies.append(args))
    parent = _filled(m, list(range(10)))  # two full blocks and one holding 2 tokens
    child = m.fork(parent, 10)
    assert child[:2] == parent[:2] and child[2] not in parent and copies == [(parent[2], child[2], 2)]
    assert [m.ref_count[b] for b in parent] == [2, 2, 1] and m.num_free == 0
    assert m.fork(parent, 8) == parent[:2]  # block-aligned: nothing to copy, so no free block is needed
    assert m.fork(parent, 10) is None and len(copies) == 1  # no block for the copy: the caller recomputes
