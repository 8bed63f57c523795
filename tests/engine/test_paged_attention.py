"""The in-place paged read (engine/paged_attention.py's kernel) against its gather reference and the dense
contiguous cache: random block tables over a shuffled pool, ragged contexts, 1..4 new tokens per row padded to
the longest, padding rows, rows sharing prefix blocks, contexts over several chunks; float32 against a float64
run of the reference (tests/numerics.py). Also eager vs compiled, and bad tables refused."""

from __future__ import annotations

import math
import os

import pytest
import torch

from openr2.engine import paged_attention
from openr2.model.mla import LatentCache, causal_mask
from tests.dsa import assert_selection_decided
from tests.numerics import assert_close_to_reference, float64_compute

pytestmark = pytest.mark.skipif(not paged_attention.load(), reason="the paged attention kernel could not be built")

LAYERS = 2


def _problem(seed, computed, num_new, H=4, C=32, R=8, block_size=8, shared_blocks=0, pad_rows=0, sharp=1.0):
    """A pool of LAYERS layers in shuffled blocks; row b has computed[b] + num_new[b] keys (its new tokens'
    queries at the last num_new[b] positions, padding queries repeating the last position, as the runner
    pads); rows 1.. share row 0's first `shared_blocks` blocks; `pad_rows` rows at the end with no tokens
    (position 0, table of block 0, as a padded batch carries them)."""
    gen = torch.Generator().manual_seed(seed)
    B, T = len(num_new), max(num_new)
    contexts = [c + n for c, n in zip(computed, num_new)]
    need = [math.ceil(ctx / block_size) for ctx in contexts]
    num_blocks = sum(need) + 3
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for b in range(B):
        own = need[b] - (shared_blocks if b > 0 else 0)
        table = (tables[0][:shared_blocks] if b > 0 else []) + [free.pop() for _ in range(own)]
        tables.append(table + [free.pop()])  # one block past the end: never read
    width = max(len(t) for t in tables)
    tables += [[0]] * pad_rows
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    positions = torch.tensor([[c + min(t, n - 1) for t in range(T)] for c, n in zip(computed, num_new)]
                             + [[0] * T] * pad_rows)
    rows = B + pad_rows
    slots = num_blocks * block_size
    pool_c = torch.randn(LAYERS, slots, C, generator=gen)
    pool_r = torch.randn(LAYERS, slots, R, generator=gen)
    q_latent = torch.randn(rows, T, H, C, generator=gen)
    q_rope = torch.randn(rows, T, H, R, generator=gen)
    scale = sharp / math.sqrt(C + R)
    return q_latent, q_rope, pool_c, pool_r, block_table, positions, block_size, scale


def _check(problem, what):
    q_latent, q_rope, pool_c, pool_r, block_table, positions, block_size, scale = problem
    for layer in range(LAYERS):
        args = (pool_c, pool_r, layer, block_table, positions, block_size, scale)
        fast = paged_attention.paged_latent_attention(q_latent, q_rope, *args)
        plain = paged_attention.gather_latent_attention(q_latent, q_rope, *args)
        ref = paged_attention.gather_latent_attention(q_latent.double(), q_rope.double(), pool_c.double(),
                                                      pool_r.double(), *args[2:])
        assert fast.shape == q_latent.shape and fast.dtype == torch.float32
        assert_close_to_reference(fast, plain, ref, what=f"{what}, layer {layer}")


@pytest.mark.parametrize("num_new", [[1, 1, 1], [1, 3, 2], [4, 1, 4], [2, 2, 2]], ids=str)
def test_kernel_equals_gather_reference_ragged_rows(num_new):
    _check(_problem(sum(num_new), [5, 17, 30], num_new), f"num_new {num_new}")


def test_padding_rows_and_shared_prefix_blocks():
    _check(_problem(1, [16, 23, 40, 9], [1, 2, 4, 3], shared_blocks=2, pad_rows=2), "padding rows, shared prefix")


@pytest.mark.parametrize("block_size", [1, 8, 64])
def test_long_contexts_over_several_chunks(block_size):
    """Contexts of a few thousand keys: several chunks per row, combined by log-sum-exp; a sharp softmax."""
    _check(_problem(block_size, [2900, 1100, 31], [1, 4, 2], block_size=block_size, sharp=4.0),
           f"long contexts, blocks of {block_size}")


@pytest.mark.parametrize(("H", "C", "R"), [(1, 16, 16), (8, 40, 8), (16, 64, 16), (3, 7, 3)],
                         ids=["one-head", "C-not-a-vector-multiple", "many-query-lanes", "odd-widths"])
def test_shapes(H, C, R):
    """Query lanes fewer, more than one vector and not a multiple of one; C and R with scalar tails."""
    _check(_problem(H * C, [12, 50], [4, 3], H=H, C=C, R=R), f"H {H}, C {C}, R {R}")


def test_a_chunk_past_some_queries():
    """A row whose queries stop at different chunks: the later chunk holds no key the early query sees."""
    problem = list(_problem(7, [1030], [4], block_size=8))  # keys 0..1033: two chunks of 1024
    problem[5] = torch.tensor([[1000, 1033, 1024, 1023]])  # queries on both sides of the chunk boundary
    _check(problem, "chunk boundary")


def test_paged_read_equals_the_dense_latent_cache():
    """The same keys in a contiguous LatentCache (the model's plain cache) and in shuffled pool blocks."""
    gen = torch.Generator().manual_seed(0)
    B, S, T, H, C, R, bs = 2, 37, 3, 4, 32, 8, 8
    c_kv, k_rope = torch.randn(B, S, C, generator=gen), torch.randn(B, S, R, generator=gen)
    dense = LatentCache(1, B, S, C, R)
    dense.write(0, c_kv, k_rope)
    blocks = math.ceil(S / bs)
    table = torch.randperm(2 * blocks, generator=gen).view(B, blocks)
    slots = paged_attention.block_slots(table, bs, S)
    pool_c, pool_r = torch.zeros(1, 2 * blocks * bs, C), torch.zeros(1, 2 * blocks * bs, R)
    pool_c[0, slots] = c_kv
    pool_r[0, slots] = k_rope
    q_latent, q_rope = torch.randn(B, T, H, C, generator=gen), torch.randn(B, T, H, R, generator=gen)
    positions = torch.arange(S - T, S).expand(B, T)
    scale = (C + R) ** -0.5
    fast = paged_attention.paged_latent_attention(q_latent, q_rope, pool_c, pool_r, 0, table, positions, bs, scale)
    plain = dense.attend(0, q_latent, q_rope, positions, scale)
    dense64 = LatentCache(1, B, S, C, R, dtype=torch.float64)
    dense64.write(0, c_kv.double(), k_rope.double())
    ref = dense64.attend(0, q_latent.double(), q_rope.double(), positions, scale)
    assert_close_to_reference(fast, plain, ref, what="paged vs contiguous cache")


def test_compiled_call_equals_eager():
    """Inside torch.compile the kernel is an opaque op (its fake gives the shape): the same numbers."""
    q_latent, q_rope, pool_c, pool_r, block_table, positions, bs, scale = _problem(3, [20, 9], [2, 3])

    def attend(q_latent, q_rope, pool_c, pool_r, block_table, positions):
        q = q_latent * 2.0  # a computed, non-contiguous input, as the model's absorbed queries are
        return paged_attention.paged_latent_attention(q.transpose(1, 2).transpose(1, 2), q_rope, pool_c, pool_r,
                                                      1, block_table, positions, bs, scale) + 1.0

    args = (q_latent, q_rope, pool_c, pool_r, block_table, positions)
    compiled = torch.compile(attend, dynamic=True, fullgraph=True)
    assert torch.equal(compiled(*args), attend(*args))


def test_bad_tables_are_refused():
    q_latent, q_rope, pool_c, pool_r, block_table, positions, bs, scale = _problem(4, [20, 9], [1, 1])
    too_far = positions.clone()
    too_far[0, 0] = block_table.shape[1] * bs  # past the table's last block
    with pytest.raises(RuntimeError, match="block table holds"):
        paged_attention.paged_latent_attention(q_latent, q_rope, pool_c, pool_r, 0, block_table, too_far, bs, scale)
    bad = block_table.clone()
    bad[1, 0] = pool_c.shape[1] // bs  # one past the pool
    with pytest.raises(RuntimeError, match="outside the pool"):
        paged_attention.paged_latent_attention(q_latent, q_rope, pool_c, pool_r, 0, bad, positions, bs, scale)


# ---------------------------------------------------------------------------------------------------------------
# The lightning indexer's scan (DeepSeek-V3.2): paged_index_scores against gather_index_scores (model/indexer.py's
# products over the gathered keys) and its float64 run; top-k selections decided by the model (tests/dsa.py).


def _index_problem(seed, computed, num_new, Hi=64, Di=32, block_size=8, shared_blocks=0, pad_rows=0):
    """_problem's tables and positions over a pool of indexer keys [LAYERS, N, Di]; random queries [rows, T, Hi,
    Di] and head weights (both signs, as weights_proj gives them). Returns (q, w, pool_k, table, positions, S, bs)."""
    *_, block_table, positions, block_size, _ = _problem(seed, computed, num_new, H=1, C=4, R=4,
                                                         block_size=block_size, shared_blocks=shared_blocks,
                                                         pad_rows=pad_rows)
    gen = torch.Generator().manual_seed(seed + 100)
    rows, T = positions.shape
    pool_k = torch.randn(LAYERS, (int(block_table.max()) + 4) * block_size, Di, generator=gen)
    q = torch.randn(rows, T, Hi, Di, generator=gen)
    w = torch.randn(rows, T, Hi, generator=gen) * Hi**-0.5
    return q, w, pool_k, block_table, positions, int(positions.max()) + 1, block_size


def _check_index(problem, what, topk=None):
    q, w, pool_k, block_table, positions, S, bs = problem
    scale = q.shape[-1] ** -0.5
    for layer in range(LAYERS):
        args = (pool_k, layer, block_table, positions, S, bs, scale)
        fast = paged_attention.paged_index_scores(q, w, *args)
        plain = paged_attention.gather_index_scores(q, w, *args)
        with float64_compute():  # the reference's .float() keeps float64
            ref = paged_attention.gather_index_scores(q.double(), w.double(), pool_k.double(), *args[1:])
        assert fast.shape == plain.shape == (*positions.shape, S) and fast.dtype == torch.float32
        visible = torch.isfinite(ref)  # keys 0..position, each query's own
        assert torch.equal(visible, causal_mask(positions, S)) and torch.equal(torch.isfinite(fast), visible)
        assert_close_to_reference(fast[visible], plain[visible], ref[visible], what=f"{what}, layer {layer}")
        if topk is not None:  # the fast scores select the float64 reference's keys where the model decides
            assert_selection_decided([fast], [ref], topk, what=f"{what}, layer {layer}")


@pytest.mark.parametrize("num_new", [[1, 1, 1], [1, 3, 2], [4, 1, 4]], ids=str)
def test_index_scan_equals_gather_reference_ragged_rows(num_new):
    """Rows of different lengths, 1..4 queries each (padded), every block boundary inside some row."""
    _check_index(_index_problem(10, [37, 5, 64], num_new), f"index scan, ragged {num_new}")


def test_index_scan_padding_rows_and_shared_prefix_blocks():
    _check_index(_index_problem(11, [40, 21, 33], [2, 1, 3], shared_blocks=2, pad_rows=2),
                 "index scan, shared prefix blocks and padding rows")


@pytest.mark.parametrize("block_size", [1, 8, 64])
def test_index_scan_long_contexts_over_several_tasks_selects_the_references_top_k(block_size):
    """Contexts past the kernel's 2048 keys per task; the top-64 of the fast scores is the float64
    reference's (each boundary gap well above the float32 error)."""
    _check_index(_index_problem(12, [5000, 2100], [1, 2], block_size=block_size), f"index scan, bs {block_size}",
                 topk=64)


@pytest.mark.parametrize(("Hi", "Di"), [(64, 128), (48, 32), (4, 16), (17, 7)], ids=str)
def test_index_scan_shapes(Hi, Di):
    """64 heads: the release's (the register-blocked form on AVX-512); others: the generic form and padded lanes."""
    _check_index(_index_problem(13, [30, 70], [3, 1], Hi=Hi, Di=Di), f"index scan, Hi {Hi}, Di {Di}")


def test_index_scan_compiled_call_equals_eager():
    q, w, pool_k, block_table, positions, S, bs = _index_problem(14, [20, 9], [2, 3])

    def scores(q, w, pool_k, block_table, positions):
        return paged_attention.paged_index_scores(q * 2.0, w, pool_k, 1, block_table, positions, S, bs, 0.25) + 1.0

    args = (q, w, pool_k, block_table, positions)
    compiled = torch.compile(scores, dynamic=True, fullgraph=True)
    assert torch.equal(compiled(*args), scores(*args))


def test_index_scan_refuses_bad_tables_and_positions():
    q, w, pool_k, block_table, positions, S, bs = _index_problem(15, [20, 9], [1, 1])
    too_far = positions.clone()
    too_far[0, 0] = block_table.shape[1] * bs  # past the table's last block
    with pytest.raises(RuntimeError, match="block table holds"):
        paged_attention.paged_index_scores(q, w, pool_k, 0, block_table, too_far, int(too_far.max()) + 1, bs, 1.0)
    bad = block_table.clone()
    bad[1, 0] = pool_k.shape[1] // bs  # one past the pool
    with pytest.raises(RuntimeError, match="outside the pool"):
        paged_attention.paged_index_scores(q, w, pool_k, 0, bad, positions, S, bs, 1.0)
    with pytest.raises(RuntimeError, match="past the"):
        paged_attention.paged_index_scores(q, w, pool_k, 0, block_table, positions, S - 1, bs, 1.0)


def test_a_killed_builds_lock_is_cleared_and_a_live_one_kept(tmp_path):
    """cpp_extension waits without limit on its build folder's lock file: one left by a killed build (old) is
    removed before building, one a running build holds (fresh) is not."""
    lock = tmp_path / "lock"
    lock.write_text("")
    assert not paged_attention.clear_stale_lock(str(tmp_path), stale_s=600) and lock.exists()
    old = lock.stat().st_mtime - 601
    os.utime(lock, (old, old))
    assert paged_attention.clear_stale_lock(str(tmp_path), stale_s=600) and not lock.exists()
    assert not paged_attention.clear_stale_lock(str(tmp_path))  # no lock: nothing to do
