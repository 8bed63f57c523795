"""The opt-in bfloat16 indexer scan (engine/paged_attention.py): a bf16 pool of indexer keys, scored with the
queries rounded to bf16 as well, by AMX tiles where the CPU has them (16 keys x 16 heads x 32 dims) and by
widened float32 code otherwise. Its reference is gather_index_scores over the same bf16 pool given the bf16-rounded
queries (float32 products); the bound comes from the float64 run of that reference on the same rounded inputs (the
products of two bf16 values are exact in float32, so only the sums' rounding differs, tests/numerics.py).
Also the pool's `index_dtype` (KVPool) and its bytes."""

from __future__ import annotations

import pytest
import torch

from openr2.engine import paged_attention
from openr2.engine.kv_cache import KVPool, bytes_per_token
from openr2.model.mla import causal_mask
from openr2.presets import tiny_v32
from tests.dsa import assert_selection_decided
from tests.engine.test_paged_attention import LAYERS, _index_problem
from tests.numerics import assert_close_to_reference, float64_compute

pytestmark = pytest.mark.skipif(not paged_attention.load(), reason="the paged attention kernel could not be built")


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " amx_bf16" in flags and " amx_tile" in flags


def _check_bf16(problem, what, topk=None):
    q, w, pool_k, block_table, positions, S, bs = problem
    pool_k = pool_k.to(torch.bfloat16)
    scale = q.shape[-1] ** -0.5
    for layer in range(LAYERS):
        args = (pool_k, layer, block_table, positions, S, bs, scale)
        fast = paged_attention.paged_index_scores(q, w, *args)
        plain = paged_attention.gather_index_scores(q.to(torch.bfloat16), w, *args)  # the kernel rounds q so
        with float64_compute():  # the same bf16-rounded queries and keys, products and sums in float64
            ref = paged_attention.gather_index_scores(q.to(torch.bfloat16).double(), w.double(), pool_k.double(),
                                                      *args[1:])
        assert fast.shape == (*positions.shape, S) and fast.dtype == torch.float32
        visible = torch.isfinite(ref)
        assert torch.equal(visible, causal_mask(positions, S)) and torch.equal(torch.isfinite(fast), visible)
        assert_close_to_reference(fast[visible], plain[visible], ref[visible], what=f"{what}, layer {layer}")
        if topk is not None:
            assert_selection_decided([fast], [ref], topk, what=f"{what}, layer {layer}")


@pytest.mark.parametrize(("Hi", "Di", "block_size"), [(64, 128, 64), (96, 32, 16), (20, 64, 32), (8, 48, 16),
                                                       (64, 128, 8)], ids=str)
def test_bf16_scan_equals_reference(Hi, Di, block_size):
    """AMX: the release's 64 x 128 (four head tiles), 96 heads (two passes of tiles), 20 (padded heads); widened
    float32: Di not a multiple of 32, blocks not of 16 keys. Ragged rows of 1..3 queries, shared prefix blocks,
    padding rows, each query's last block partly visible."""
    amx = paged_attention.index_scan_amx(Di, block_size)
    assert amx == (_cpu_has_amx() and Di % 32 == 0 and block_size % 16 == 0)
    _check_bf16(_index_problem(20, [70, 21, 133], [1, 3, 2], Hi=Hi, Di=Di, block_size=block_size, shared_blocks=1,
                               pad_rows=1), f"bf16 scan, Hi {Hi}, Di {Di}, bs {block_size}, amx {amx}")


def test_bf16_scan_long_context_selects_the_references_top_k():
    """Past the 2048 keys of one task; the top-64 of the bf16 scan is its float64 reference's."""
    _check_bf16(_index_problem(21, [5000, 2100], [1, 2], Di=128, block_size=64), "bf16 scan, long", topk=64)


def test_pool_index_dtype_and_the_views_scores():
    """KVPool(index_dtype=bf16) stores the indexer keys in bf16 (the latents in the pool's dtype), counts them in
    its bytes, and the view reads them with the kernel (whose numbers the tests above hold to the reference)."""
    cfg = tiny_v32()
    pool = KVPool(cfg, num_blocks=6, block_size=16, index_dtype=torch.bfloat16)
    assert pool.k_index.dtype == torch.bfloat16 and pool.c_kv.dtype == torch.float32
    saved = cfg.num_hidden_layers * cfg.index_head_dim * 2
    assert bytes_per_token(cfg, torch.float32, index_dtype=torch.bfloat16) == bytes_per_token(cfg, torch.float32) - saved
    by_budget = KVPool.from_budget(cfg, pool.nbytes, 16, index_dtype=torch.bfloat16)
    assert by_budget.num_blocks == 6 and by_budget.nbytes == pool.nbytes
    gen = torch.Generator().manual_seed(22)
    pool.k_index.copy_(torch.randn(pool.k_index.shape, generator=gen))
    tables, computed, new = [[3, 1, 5], [0, 2]], [37, 20], [2, 1]
    q = torch.randn(2, 2, cfg.index_n_heads, cfg.index_head_dim, generator=gen)
    w = torch.randn(2, 2, cfg.index_n_heads, generator=gen)
    positions = torch.tensor([[37, 38], [20, 20]])
    scale = cfg.index_head_dim**-0.5
    view = pool.view(tables, computed, new)
    fast = view.index_scores(0, q, w, positions, scale)  # the bf16 pool read in place: the kernel's scores
    kernel = paged_attention.paged_index_scores(q, w, pool.k_index, 0, view.block_table, positions, view.num_keys,
                                                16, scale)
    assert torch.equal(fast, kernel)
    plain = pool.view(tables, computed, new, read="gather").index_scores(0, q, w, positions, scale)
    assert torch.equal(torch.isfinite(plain), torch.isfinite(fast))
    assert plain.dtype == torch.float32
    with pytest.raises(ValueError, match="index_dtype"):
        KVPool(cfg, num_blocks=2, block_size=16, index_dtype=torch.float16)


def test_engine_index_cache_dtype_bf16_scans_the_bf16_keys_with_the_kernel(monkeypatch):
    """EngineConfig(index_cache_dtype="bfloat16") (the CLI's --index-cache-dtype): the engine's pool keeps bf16
    indexer keys beside float32 latents and every indexer score of chunked prefills and decodes (prompts several
    times index_topk) comes from the kernel over them (whose numbers the tests above hold to the reference; token
    for token equality with the gather read is not asserted: bf16 scores tie exactly more often than float32
    ones, and a tie at the top-k boundary may go either way under another summation order). A model without an
    indexer, and other dtypes, are refused."""
    from openr2.engine.llm import LLM
    from openr2.engine.sampling import SamplingParams
    from openr2.model.transformer import build_model
    from openr2.presets import tiny_v3

    model = build_model(tiny_v32(), seed=7).eval()
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (40, 17, 70)]
    scanned, kernel = [], paged_attention.paged_index_scores

    def spy(q, w, pool_k, *args):
        scanned.append((pool_k.dtype, q.shape[1]))
        return kernel(q, w, pool_k, *args)

    monkeypatch.setattr(paged_attention, "paged_index_scores", spy)
    monkeypatch.setattr(paged_attention, "gather_index_scores", None)  # never the reference
    llm = LLM(model, compile=False, block_size=16, num_blocks=24, max_num_batched_tokens=32,
              index_cache_dtype="bfloat16")
    assert llm.engine.pool.k_index.dtype == torch.bfloat16 and llm.engine.pool.c_kv.dtype == torch.float32
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6, 6]
    assert {d for d, _ in scanned} == {torch.bfloat16} and max(t for _, t in scanned) > 1  # prefills and decodes
    with pytest.raises(ValueError, match="V3.2"):
        LLM(build_model(tiny_v3(), seed=0), compile=False, num_blocks=4, index_cache_dtype="bfloat16")
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        LLM(model, compile=False, num_blocks=4, index_cache_dtype="float16")
