"""The paged pool and its per-forward view: sizing from one budget over the layers' cache kinds, writes of
ragged multi-token rows (padding never written), copy-on-write, and a whole model stepping rows of 1..4 new
tokens over a paged cache (ragged contexts, a shared prefix, both reads) against the full forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from openr2.engine.kv_cache import KVPool, LatentKind, bytes_per_token, cache_kinds
from openr2.model.transformer import build_model
from openr2.presets import tiny_v3
from tests.numerics import assert_close_to_reference, reference64


@pytest.fixture(scope="module")
def model():
    model = build_model(dataclasses.replace(tiny_v3(), num_nextn_predict_layers=0), seed=3).eval()
    with torch.no_grad():  # a fresh init is nearly uniform: spread the attention and the logits
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + 3)) * 0.5)
    return model


def test_pool_sized_from_one_budget_over_the_layers_kinds():
    config = tiny_v3()
    L, C, R = config.num_hidden_layers, config.kv_lora_rank, config.qk_rope_head_dim
    kinds = cache_kinds(config, L + 1)  # the decoder layers and one MTP layer
    assert kinds == [LatentKind(C, R)] * (L + 1) and kinds[0].fields == {"c_kv": C, "k_rope": R}
    per_block = 16 * (L + 1) * (C + R) * 4
    assert bytes_per_token(config, torch.float32, L + 1) * 16 == per_block
    pool = KVPool.from_budget(config, 10 * per_block + per_block - 1, block_size=16, num_layers=L + 1)
    assert pool.num_blocks == 10 and pool.nbytes == 10 * per_block
    assert pool.c_kv.shape == (L + 1, 160, C) and pool.k_rope.shape == (L + 1, 160, R)
    assert KVPool.from_budget(config, 10 * per_block, block_size=16).num_blocks == 10 * (L + 1) // L
    with pytest.raises(ValueError, match="raise the cache memory budget"):
        KVPool.from_budget(config, per_block - 1, block_size=16, num_layers=L + 1)


def test_copy_block_copies_every_layer_and_field():
    pool = KVPool(tiny_v3(), num_blocks=4, block_size=8)
    pool.c_kv.normal_()
    pool.k_rope.normal_()
    pool.copy_block(1, 3, num_tokens=5)
    assert torch.equal(pool.c_kv[:, 24:29], pool.c_kv[:, 8:13]) and torch.equal(pool.k_rope[:, 24:29], pool.k_rope[:, 8:13])
    assert not torch.equal(pool.c_kv[:, 29], pool.c_kv[:, 13])


def test_view_writes_each_rows_new_tokens_and_no_padding():
    """Rows with 3, 1 and 4 new tokens after 5, 8 and 0 cached ones, padded to 4: each valid token lands in
    its slot (block table entry of its position), padding tokens nowhere; the gather read returns contexts
    in position order."""
    config = tiny_v3()
    pool = KVPool(config, num_blocks=8, block_size=4)
    tables, computed, new = [[6, 2, 5], [1, 7, 3], [4]], [5, 8, 0], [3, 1, 4]
    view = pool.view(tables, computed, new)
    B, T, C, R = 3, 4, config.kv_lora_rank, config.qk_rope_head_dim
    c_kv = torch.arange(1, B * T + 1, dtype=torch.float32).view(B, T, 1).expand(B, T, C).contiguous()
    view.write(1, c_kv, torch.zeros(B, T, R))
    want = torch.zeros(pool.c_kv.shape[1])
    for b in range(B):
        for t in range(new[b]):
            pos = computed[b] + t
            want[tables[b][pos // 4] * 4 + pos % 4] = c_kv[b, t, 0]
    assert torch.equal(pool.c_kv[1, :, 0], want) and pool.c_kv[[0, 2]].abs().sum() == 0
    context, _ = view.read(1)
    assert context.shape == (B, 9, C)
    assert context[0, 5:8, 0].tolist() == [1, 2, 3] and context[1, 8, 0] == 5 and context[2, :4, 0].tolist() == [9, 10, 11, 12]
    assert view.block_table.shape == (3, 3) and view.write_slots.numel() == sum(new)
    with pytest.raises(ValueError, match="read must be one of"):
        pool.view(tables, computed, new, read="dense")


def test_decode_args_equal_the_views():
    """KVPool.decode_args (lists, for the compiled steps' few new tokens) builds exactly the tensors of a
    PagedView over rows of the same width, whatever the row lengths and block order."""
    pool = KVPool(tiny_v3(), num_blocks=16, block_size=4)
    gen = torch.Generator().manual_seed(1)
    for computed, width in (([5, 8, 0], 1), ([3], 2), ([7, 12, 1, 3], 3), ([0], 4), ([2, 9], 1)):
        tables = [torch.randperm(16, generator=gen)[: -(-(c + width) // 4) + 1].tolist() for c in computed]
        fast = pool.decode_args(tables, computed, width)
        plain = pool.view(tables, computed, [width] * len(computed)).decode_args()
        assert fast[0] is plain[0] and fast[1] is plain[1] and fast[-1] == plain[-1]
        for got, want in zip(fast[2:-1], plain[2:-1]):
            assert got.dtype == want.dtype and torch.equal(got, want), (computed, width)


def _fill(model, pool, table, ids, start):
    """Prefill ids[start:] of one sequence through the paged cache (naive path), as the engine does."""
    n = len(ids) - start
    view = pool.view([table], [start], [n])
    positions = torch.arange(start, len(ids))[None]
    with torch.inference_mode():
        model(torch.tensor([ids[start:]]), positions, cache=view, attn_impl="naive")


@pytest.mark.parametrize("read", ["blocks", "gather"])
def test_rows_of_one_to_four_new_tokens_equal_the_full_forward(model, read):
    """Four rows over a paged cache (blocks shuffled; rows 0 and 1 share two prefix blocks), then one step in
    which they carry 1, 4, 2 and 3 new tokens (padded to 4): the logits of every new position equal those of
    a full forward over each whole sequence."""
    V, bs = model.config.vocab_size, 8
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, V, (16,), generator=gen).tolist()
    prompts = [prefix + torch.randint(0, V, (7,), generator=gen).tolist(),
               prefix + torch.randint(0, V, (12,), generator=gen).tolist(),
               torch.randint(0, V, (5,), generator=gen).tolist(),
               torch.randint(0, V, (30,), generator=gen).tolist()]
    num_new = [1, 4, 2, 3]
    drafts = [torch.randint(0, V, (n,), generator=gen).tolist() for n in num_new]
    pool = KVPool(model.config, num_blocks=24, block_size=bs)
    free = torch.randperm(24, generator=gen).tolist()
    tables = []
    for b, (prompt, n) in enumerate(zip(prompts, num_new)):
        shared = tables[0][:2] if b == 1 else []
        tables.append(shared + [free.pop() for _ in range(-(-(len(prompt) + n) // bs) - len(shared))])
    for b, prompt in enumerate(prompts):
        _fill(model, pool, tables[b], prompt, start=16 if b == 1 else 0)  # row 1: a prefix-cache hit
    T = max(num_new)
    ids = torch.tensor([d + [0] * (T - len(d)) for d in drafts])
    positions = torch.tensor([[len(p) + min(t, len(d) - 1) for t in range(T)] for p, d in zip(prompts, drafts)])
    view = pool.view(tables, [len(p) for p in prompts], num_new, read=read)
    with torch.inference_mode():
        step = model(ids, positions, cache=view, attn_impl="absorbed")  # [B, T, V]
    fast, plain, ref = [], [], []
    for b, (prompt, d) in enumerate(zip(prompts, drafts)):
        full = torch.tensor([prompt + d])
        with torch.inference_mode():
            plain.append(model(full)[0, len(prompt):])
        ref.append(reference64(model, full)[0, len(prompt):])
        fast.append(step[b, : len(d)])
    assert_close_to_reference(torch.cat(fast), torch.cat(plain), torch.cat(ref),
                              what=f"1..4 new tokens per row over the paged cache ({read})")
