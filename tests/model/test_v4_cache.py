"""DeepSeek-V4's CompressedCache (model/compressed.py): prefill in chunks and decode token by token equal the
full forward at every position, across window (16), CSA block (4) and HCA block (16) boundaries, chunks
shorter and longer than a block or the window; and the CSA layers' gathered path (attn_impl "sparse") equals
the masked reference ("naive"), with and without the cache. Compared as tests/numerics.py does (the cached path's error
against a float64 full forward within a small factor of the full float32 forward's), after checking that
the indexer's top-k selection is decided by the model, not by rounding (tests/dsa.py's rule)."""

from __future__ import annotations

import pytest
import torch

from openr2.model.compressed import CompressedCache
from openr2.model.transformer import build_model, greedy_cached, greedy_full_forward
from openr2.presets import tiny_v4
from tests.hf_utils import perturb_
from tests.numerics import assert_close_to_reference, reference64
from tests.v4 import assert_decided

CHUNKS = [7, 1, 1, 9, 16, 1, 3, 20, 1, 1, 1, 2, 33, 1, 1]  # 97 tokens


@pytest.fixture(scope="module")
def model():
    m = build_model(tiny_v4(), seed=0)
    perturb_(m, seed=7, scale=0.1)  # sinks, position biases and hyper-connection biases off zero too
    return m.eval()


@pytest.mark.parametrize("attn_impl", ["naive", "sparse"])
def test_chunks_and_decode_equal_the_full_forward(model, attn_impl):
    ids = torch.randint(0, model.config.vocab_size, (2, sum(CHUNKS)), generator=torch.Generator().manual_seed(3))
    assert_decided(model, ids, what="v4 cache")
    with torch.no_grad():
        full = model(ids)
    ref = reference64(model, ids)
    cache, parts, start = CompressedCache.for_model(model.config), [], 0
    with torch.no_grad():
        for n in CHUNKS:
            parts.append(model(ids[:, start : start + n], cache=cache, attn_impl=attn_impl))
            start += n
    assert cache.length == ids.shape[1]
    assert_close_to_reference(torch.cat(parts, dim=1), full, ref, what=f"V4 cached {attn_impl} vs full naive")
    with torch.no_grad():
        sparse = model(ids, attn_impl="sparse")
    assert_close_to_reference(sparse, full, ref, what="V4 sparse vs naive, no cache")
    with pytest.raises(ValueError, match="attn_impl"):
        model(ids[:, :4], attn_impl="absorbed")


def test_cache_refuses_other_positions(model):
    cache = CompressedCache.for_model(model.config)
    ids = torch.zeros(1, 5, dtype=torch.long)
    with torch.no_grad():
        model(ids, cache=cache)
        with pytest.raises(ValueError, match="positions must run 5..9"):
            model(ids, positions=torch.arange(5)[None], cache=cache)


def test_greedy_cached_equals_full_forward(model):
    """Each step's top-2 margin is checked to exceed 100x the paths' logit difference: no near-tie decides."""
    prompt = torch.randint(0, model.config.vocab_size, (2, 45), generator=torch.Generator().manual_seed(4))
    full = greedy_full_forward(model, prompt, 24)
    with torch.no_grad():
        top2 = model(full)[:, prompt.shape[1] - 1 : -1].topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3, "a greedy step is a near-tie; choose another seed"
    assert torch.equal(greedy_cached(model, prompt, 24), full)
    assert torch.equal(greedy_cached(model, prompt, 24, attn_impl="naive"), full)


def test_sparse_before_the_first_entry(model):
    """Several queries and no complete compressed entry yet (a prompt shorter than a CSA block): the gathered
    path picks nothing and attends the window alone, as the masked reference does."""
    ids = torch.tensor([[5, 9, 2]])
    with torch.no_grad():
        naive, sparse = model(ids), model(ids, attn_impl="sparse")
    assert_close_to_reference(sparse, naive, reference64(model, ids), what="V4 sparse with no entries")


def test_index_scores_in_query_chunks_equal_one_pass(monkeypatch):
    """The indexer's products formed a few queries at a time (as a long prompt chunk over a long context is):
    the same scores as in one pass (within its float32 error against float64), the mask included."""
    import openr2.model.compressed as compressed
    from tests.numerics import float64_compute

    gen = torch.Generator().manual_seed(0)
    q, keys = torch.randn(2, 9, 4, 8, generator=gen), torch.randn(2, 6, 8, generator=gen)
    weights, visible = torch.randn(2, 9, 4, generator=gen), torch.rand(2, 9, 6, generator=gen) > 0.3
    whole = compressed.compressed_index_scores(q, keys, weights, visible)
    monkeypatch.setattr(compressed, "SCORE_CHUNK_ELEMENTS", 2 * 4 * 6 * 2)  # 2 queries per chunk
    chunked = compressed.compressed_index_scores(q, keys, weights, visible)
    with float64_compute():  # its .float() keeps float64
        ref = compressed.compressed_index_scores(q.double(), keys.double(), weights.double(), visible)
    assert ref.dtype == torch.float64 and torch.equal(torch.isinf(chunked), ~visible)
    assert_close_to_reference(chunked[visible], whole[visible], ref[visible], what="indexer scores in chunks")


def test_rows_at_different_lengths_decode_together(model):
    """CompressedCacheRows: two rows prefilled to 37 and 52 tokens in their own caches, then 20 steps decoded in
    one batch (attention row by row, the rest batched): every step equals the full forward of its row."""
    from openr2.model.compressed import CompressedCacheRows

    gen = torch.Generator().manual_seed(6)
    seqs = [torch.randint(0, model.config.vocab_size, (1, n + 20), generator=gen) for n in (37, 52)]
    for ids in seqs:
        assert_decided(model, ids, what="v4 rows")
    caches = [CompressedCache.for_model(model.config) for _ in seqs]
    with torch.no_grad():
        for ids, cache in zip(seqs, caches):
            model(ids[:, :-20], cache=cache, attn_impl="sparse")
        rows, steps = CompressedCacheRows(caches), []
        for s in range(20):
            ids = torch.cat([q[:, q.shape[1] - 20 + s : q.shape[1] - 19 + s] for q in seqs])
            positions = torch.tensor([[c.length] for c in caches])
            steps.append(model(ids, positions, cache=rows, attn_impl="sparse"))
        with pytest.raises(ValueError, match="continue each row's cache length"):
            model(ids, positions, cache=rows)
    assert [c.length for c in caches] == [57, 72]
    got = torch.cat(steps, dim=1)  # [2, 20, V]
    for b, ids in enumerate(seqs):
        with torch.no_grad():
            full = model(ids)[:, -20:]
        assert_close_to_reference(got[b : b + 1], full, reference64(model, ids)[:, -20:], what=f"V4 rows, row {b}")


@pytest.mark.parametrize("attn_impl", ["naive", "sparse"])
def test_long_chunks_attend_in_query_blocks(model, attn_impl, monkeypatch):
    """Queries in blocks of 7, each over only the window keys it can see (as long chunks run): the same logits
    as one block, without a cache and in cached chunks of 40 and 57 (blocks straddling the past window)."""
    import openr2.model.compressed as compressed

    ids = torch.randint(0, model.config.vocab_size, (2, 97), generator=torch.Generator().manual_seed(3))
    assert_decided(model, ids, what="v4 query blocks")
    with torch.no_grad():
        whole = model(ids, attn_impl=attn_impl)
        monkeypatch.setattr(compressed, "WINDOW_QUERY_BLOCK", 7)
        blocked = model(ids, attn_impl=attn_impl)
        cache = CompressedCache.for_model(model.config)
        chunked = torch.cat([model(ids[:, :40], cache=cache, attn_impl=attn_impl),
                             model(ids[:, 40:], cache=cache, attn_impl=attn_impl)], dim=1)
    ref = reference64(model, ids)
    assert_close_to_reference(blocked, whole, ref, what=f"V4 query blocks {attn_impl}")
    assert_close_to_reference(chunked, whole, ref, what=f"V4 query blocks, cached chunks {attn_impl}")
