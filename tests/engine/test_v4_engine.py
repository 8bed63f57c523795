"""DeepSeek-V4 in the engine (engine/v4_cache.py): the pool's kinds from one budget; the model over paged
rows (chunked prefill, decode, a prefix-cache hit, a recompute after preemption) equals its full forward at
every position, across window (16), CSA block (4), HCA block (16) and cache block (16) boundaries; `LLM`
greedy generation equals transformers' `generate`, with a prefix-cache hit and with preemptions.

The CSA indexer's top-k is discontinuous, so whole-model comparisons first check that rounding cannot change
a selection (tests/v4.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from openr2.engine.v4_cache import V4Pool
from openr2.model.transformer import build_model
from openr2.presets import tiny_v4
from tests.hf_utils import perturb_
from tests.numerics import assert_close_to_reference, reference64
from tests.v4 import assert_decided

BS = 16  # cache block: a multiple of tiny_v4's compression rates 4 and 16, as long as its window


@pytest.fixture(scope="module")
def model():
    m = build_model(tiny_v4(), seed=0)
    perturb_(m, seed=7, scale=0.1)  # sinks, position biases and hyper-connection biases off zero too
    return m.eval()


def test_pool_kinds_from_one_budget():
    config = tiny_v4()  # layers: sliding, CSA 4, HCA 16, CSA 4; Dh 32, Di 16
    Dh, Di, e = config.head_dim, config.index_head_dim, 4
    window = 4 * (config.sliding_window - 1) * Dh * e  # each block keeps the window at its end
    csa = BS // 4 * (Dh + Di) * e + 4 * (Dh + Di) * (e + 4)  # entries, indexer entries, overlap halves
    hca = BS // 16 * Dh * e
    per_block = window + 2 * csa + hca
    assert V4Pool.bytes_per_block(config, BS, torch.float32) == per_block
    pool = V4Pool.from_budget(config, 10 * per_block + per_block - 1, block_size=BS)
    assert pool.num_blocks == 10 and pool.nbytes == 10 * per_block
    assert pool.entries[1].shape == (10 * BS // 4, Dh) and pool.entries[2].shape == (10 * BS // 16, Dh)
    assert pool.index_entries[3].shape == (10 * BS // 4, Di) and set(pool.index_entries) == {1, 3}
    # running sequences' compressor states come out of the same budget
    running = 3 * V4Pool.row_state_bytes(config, BS, torch.float32)
    assert V4Pool.from_budget(config, 10 * per_block + running, block_size=BS, max_num_seqs=3).num_blocks == 10
    assert V4Pool.from_budget(config, 10 * per_block + running - 1, block_size=BS, max_num_seqs=3).num_blocks == 9
    quarter = "keeps the window.s keys at a quarter per token"
    with pytest.raises(ValueError, match=rf"multiple of every compression rate.*for example block_size 16 \(64 {quarter}\)$"):
        V4Pool(config, 4, block_size=8)  # HCA's 16 tokens per entry would straddle blocks
    with pytest.raises(ValueError, match=rf"block_size >= sliding_window - 1.*for example block_size 48 \(160 {quarter}\)$"):
        V4Pool(dataclasses.replace(config, sliding_window=40), 4, block_size=32)
    assert pool.window.shape == (4, 10 * 15, Dh)
    pool.entries[1].normal_()
    pool.copy_block(1, 3, num_tokens=9)  # copy-on-write: 2 complete CSA entries, no HCA entry
    assert torch.equal(pool.entries[1][12:14], pool.entries[1][4:6])
    assert not torch.equal(pool.entries[1][14], pool.entries[1][6])


def test_paged_rows_equal_the_full_forward(model):
    """Row 0: chunked prefill (chunks 7, 9, 20, 1, 30: inside a block, onto a boundary, across one and two)
    then 20 decode steps. Row 1: a prefix-cache hit on row 0's first three blocks (48 tokens; its state
    rebuilt from the pool), one chunk, then decode. Row 2 = row 0's tokens recomputed after a preemption:
    a fresh table, in chunks of 33. The logits at every position equal the full forward's."""
    config, V = model.config, model.config.vocab_size
    gen = torch.Generator().manual_seed(3)
    seq0 = torch.randint(0, V, (87,), generator=gen).tolist()
    seq1 = seq0[:48] + torch.randint(0, V, (40,), generator=gen).tolist()
    for seq in (seq0, seq1):
        assert_decided(model, torch.tensor([seq]), what="v4 engine rows")
    pool = V4Pool(config, num_blocks=24, block_size=BS)
    free = torch.randperm(24, generator=gen).tolist()
    tables = [[free.pop() for _ in range(6)]]
    tables.append(tables[0][:3] + [free.pop() for _ in range(3)])
    tables.append([free.pop() for _ in range(6)])
    seqs = [seq0, seq1, seq0]
    got: list[dict[int, torch.Tensor]] = [{}, {}, {}]
    states = [None, None, None]

    def forward(b, start, n):
        cache = pool.row_cache(tables[b], start, states[b])
        with torch.inference_mode():
            logits = model(torch.tensor([seqs[b][start : start + n]]), cache=cache, attn_impl="sparse")
        states[b] = cache.row_state()
        for t in range(n):
            got[b][start + t] = logits[0, t]

    start = 0
    for n in (7, 9, 20, 1, 30):
        forward(0, start, n)
        start += n
    forward(1, 48, 20)  # the hit: starts at a block boundary without a state
    for s in range(20):
        forward(0, 67 + s, 1)
        forward(1, 68 + s, 1)
    for start in range(0, 87, 33):
        forward(2, start, min(33, 87 - start))
    fast, plain, ref = [], [], []
    for b, seq in enumerate(seqs):
        cols = sorted(got[b])
        assert cols == list(range(48 if b == 1 else 0, len(seq)))
        full = torch.tensor([seq])
        with torch.inference_mode():
            plain.append(model(full)[0, cols])
        ref.append(reference64(model, full)[0, cols])
        fast.append(torch.stack([got[b][c] for c in cols]))
    assert_close_to_reference(torch.cat(fast), torch.cat(plain), torch.cat(ref),
                              what="V4 over the paged cache vs the full forward")


@pytest.mark.parametrize("dtype,bs", [(torch.float32, BS), (torch.bfloat16, BS), (torch.float32, 32),
                                      (torch.float32, 64)])
def test_paged_rows_are_the_compressed_cache_bit_for_bit(model, dtype, bs):
    """What the pool stores is what CompressedCache keeps: a row in chunks (7, 9, 16, 16, 19 across a block end,
    then decode) and a prefix-cache hit on its first 48 tokens give the very logits CompressedCache gives with the same chunks,
    in float32 and in bfloat16 (stored in the model's dtype, gates in float32); in blocks of 16, of 32 (the
    hit mid-block: 32 tokens from the pool, 16 recomputed) and of 64 (4 x the window: no hit, the row's window
    from its running state across the block end)."""
    import copy

    from openr2.model.compressed import CompressedCache
    from openr2.model.transformer import cast_model

    m = cast_model(copy.deepcopy(model), dtype)
    V = m.config.vocab_size
    gen = torch.Generator().manual_seed(8)
    seq0 = torch.randint(0, V, (72,), generator=gen).tolist()
    seq1 = seq0[:48] + torch.randint(0, V, (25,), generator=gen).tolist()
    chunks0, chunks1 = [7, 9, 16, 16, 19, 1, 1, 1, 1, 1], [7, 9, 16, 16, 21, 1, 1, 1, 1]
    pool = V4Pool(m.config, num_blocks=12, block_size=bs, dtype=dtype)
    hit = 48 // bs * bs
    tables = [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4][: hit // bs] + [5, 6, 7, 8]]
    paged, plain = [[], []], [[], []]
    with torch.inference_mode():
        for b, (seq, chunks) in enumerate(((seq0, chunks0), (seq1, chunks1))):
            ref, state, start = CompressedCache.for_model(m.config), None, 0
            for n in chunks:
                ids = torch.tensor([seq[start : start + n]])
                plain[b].append(m(ids, cache=ref, attn_impl="sparse"))
                if b == 0 or start >= hit:  # row 1's first `hit` tokens come from row 0's blocks
                    cache = pool.row_cache(tables[b], start, state)
                    paged[b].append(m(ids, cache=cache, attn_impl="sparse"))
                    state = cache.row_state()
                else:
                    plain[b].pop()
                start += n
    for b in range(2):
        assert torch.equal(torch.cat(paged[b], dim=1), torch.cat(plain[b], dim=1)), f"row {b} ({dtype})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_state_bytes_is_the_largest_state(model, dtype):
    """After 47 tokens (15 window keys in the cache block of 16, 3 pending in each CSA block of 4, 15 in the HCA
    block of 16: the most) a row's state
    takes exactly row_state_bytes; after 48 (none pending) less."""
    import copy

    from openr2.model.transformer import cast_model

    m = cast_model(copy.deepcopy(model), dtype)
    pool = V4Pool(m.config, num_blocks=4, block_size=BS, dtype=dtype)
    cache = pool.row_cache([0, 1, 2, 3], 0, None)
    with torch.inference_mode():
        m(torch.arange(47)[None], cache=cache)
    state = cache.row_state()

    def nbytes(state):
        keys = sum(t.numel() * t.element_size() for t in state.keys)
        return keys + sum(t.numel() * t.element_size() for layer in state.states for pair in layer
                          if pair is not None for t in pair if t is not None)

    assert nbytes(state) == V4Pool.row_state_bytes(m.config, BS, dtype)
    cache = pool.row_cache([0, 1, 2, 3], 47, state)
    with torch.inference_mode():
        m(torch.tensor([[3]]), cache=cache)
    assert nbytes(cache.row_state()) < V4Pool.row_state_bytes(m.config, BS, dtype)


def test_sparse_rows_read_only_the_selected_entries(model, monkeypatch):
    """On the gathered path a CSA layer's own entries are never gathered whole from the pool: each query's
    index_topk are read by row (`take`), and the indexer's entries are scanned where they lie (`index_scores`,
    the fused kernel), never gathered either; only HCA's are (`all`). The masked reference ("naive") reads
    every entry, and both give the same logits."""
    from openr2.engine import paged_attention, v4_cache

    assert paged_attention.load(), "the paged kernel builds here"
    config = model.config
    calls = []
    for name in ("all", "take", "index_scores"):
        original = getattr(v4_cache.PagedEntries, name)

        def spy(self, *args, _name=name, _original=original):
            calls.append((_name, self.store.data_ptr()))
            return _original(self, *args)

        monkeypatch.setattr(v4_cache.PagedEntries, name, spy)
    scanned = []
    original_scan = paged_attention.paged_index_scores
    monkeypatch.setattr(paged_attention, "paged_index_scores",
                        lambda *args: scanned.append(args[2].data_ptr()) or original_scan(*args))
    ids = torch.randint(0, config.vocab_size, (1, 81), generator=torch.Generator().manual_seed(2))
    assert_decided(model, ids, what="v4 selected entries")
    out = {}
    for impl in ("sparse", "naive"):
        pool = V4Pool(config, num_blocks=6, block_size=BS)
        cache = pool.row_cache([0, 1, 2, 3, 4, 5], 0, None)
        with torch.inference_mode():
            model(ids[:, :80], cache=cache, attn_impl=impl)
            calls.clear()
            scanned.clear()
            cache = pool.row_cache([0, 1, 2, 3, 4, 5], 80, cache.row_state())
            out[impl] = model(ids[:, 80:], cache=cache, attn_impl=impl)  # 20 entries per CSA layer, top-8
        csa = {pool.entries[i].data_ptr() for i in (1, 3)}
        index = {pool.index_entries[i].data_ptr() for i in (1, 3)}
        whole = {ptr for name, ptr in calls if name == "all"}
        assert set(scanned) == index and {ptr for name, ptr in calls if name == "index_scores"} == index
        assert pool.entries[2].data_ptr() in whole and not whole & index
        if impl == "sparse":
            assert whole == {pool.entries[2].data_ptr()} and {ptr for name, ptr in calls if name == "take"} == csa
        else:
            assert whole >= csa
    assert_close_to_reference(out["sparse"], out["naive"], reference64(model, ids)[:, 80:],
                              what="paged sparse vs naive")


def test_paged_index_scan_equals_the_gathered_scores():
    """The indexer's scan in place (PagedEntries.index_scores: the fused kernel over the entries' pool rows through
    a shuffled block table, 4 entries per block) equals the reference products over the gathered entries
    (CompressorState.index_scores), for a prompt chunk whose first queries see no entry yet (all -inf) and for
    one query past 37 entries; within float32 rounding of the float64 products."""
    from openr2.engine.v4_cache import PagedEntries
    from openr2.model.compressed import CompressorState

    config = tiny_v4()
    gen = torch.Generator().manual_seed(4)
    pool = V4Pool(config, num_blocks=12, block_size=BS)
    Hi, Di = config.index_n_heads, config.index_head_dim
    table = torch.randperm(12, generator=gen)[:10]
    for start, T in ((0, 23), (151, 1)):
        st = PagedEntries(pool=pool, store=pool.index_entries[1], table=table, rate=4, stored=start // 4)
        st.extend(torch.randn(1, (start + T) // 4 - start // 4, Di, generator=gen))
        if start:
            pool.index_entries[1][st.slots()[: start // 4]] = torch.randn(start // 4, Di, generator=gen)
        q, w = torch.randn(1, T, Hi, Di, generator=gen), torch.randn(1, T, Hi, generator=gen)
        positions = torch.arange(start, start + T)[None]
        plain = CompressorState(entries=st.all(), rate=4)
        got, want = st.index_scores(q, w, positions), plain.index_scores(q, w, positions)
        dots = torch.einsum("bthd,bnd->bthn", q.double(), st.all().double()).relu() * Di ** -0.5
        ref = torch.einsum("bthn,bth->btn", dots, w.double())
        assert torch.equal(got.isinf(), want.isinf()) and bool(got[0, :3].isinf().all()) == (start == 0)
        finite = ~want.isinf()
        assert_close_to_reference(got[finite], want[finite], ref[finite], what="paged index scan")


def test_decode_rows_batched_equal_row_by_row(model):
    """Decode rows at different lengths in one forward (CompressedCacheRows: projections and attention batched,
    each row's keys padded to the longest) give each row's own forward's logits: rows of 5 tokens (no HCA entry,
    one CSA entry: fewer than top-8), 40 and 87 (more entries than index_topk) over the paged cache, against
    each row alone over the contiguous CompressedCache, for 6 steps (crossing CSA, HCA and cache-block
    boundaries)."""
    from openr2.model.compressed import CompressedCache, CompressedCacheRows

    config, V = model.config, model.config.vocab_size
    gen = torch.Generator().manual_seed(21)
    lengths = (5, 40, 87)
    seqs = [torch.randint(0, V, (n + 6,), generator=gen).tolist() for n in lengths]
    for seq in seqs[1:]:  # the short row sees at most 2 entries: it keeps them all
        assert_decided(model, torch.tensor([seq]), what="v4 batched rows")
    pool = V4Pool(config, num_blocks=24, block_size=BS)
    tables = [[b + 8 * r for b in torch.randperm(8, generator=gen).tolist()] for r in range(3)]
    with torch.inference_mode():
        states, plain = [], [CompressedCache.for_model(config) for _ in seqs]
        for r, (seq, n) in enumerate(zip(seqs, lengths)):
            cache = pool.row_cache(tables[r], 0, None)
            model(torch.tensor([seq[:n]]), cache=cache, attn_impl="sparse")
            states.append(cache.row_state())
            model(torch.tensor([seq[:n]]), cache=plain[r], attn_impl="sparse")
        got, want = [], []
        for step in range(6):
            ids = torch.tensor([[seq[n + step]] for seq, n in zip(seqs, lengths)])
            positions = torch.tensor([[n + step] for n in lengths])
            rows = [pool.row_cache(tables[r], n + step, states[r]) for r, n in enumerate(lengths)]
            got.append(model(ids, positions, cache=CompressedCacheRows(rows), attn_impl="sparse"))
            states = [row.row_state() for row in rows]
            want.append(torch.cat([model(ids[r : r + 1], positions[r : r + 1], cache=plain[r], attn_impl="sparse")
                                   for r in range(3)]))
    full = [torch.tensor([seq]) for seq in seqs]
    ref = torch.stack([torch.cat([reference64(model, f)[0, n + s] for f, n in zip(full, lengths)])
                       for s in range(6)])
    assert_close_to_reference(torch.stack([g[:, 0].reshape(-1) for g in got]),
                              torch.stack([w[:, 0].reshape(-1) for w in want]), ref.view(6, -1),
                              what="V4 decode rows batched vs one by one")


def _greedy_full(model, prompt: list[int], new: int) -> list[int]:
    seq = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(new):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prompt):].tolist()


def test_llm_greedy_with_preemption_equals_the_full_forward(model):
    """A pool of 12 blocks for four sequences of up to 6 blocks each: the scheduler preempts and recomputes
    (prefix-cache hits on the recomputed blocks, running states dropped); prompt chunks of at most 24 tokens
    run beside decode rows. Every output equals greedy decoding by the full forward."""
    from openr2.engine.llm import LLM
    from openr2.engine.sampling import SamplingParams

    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 40, 17, 53)]
    new = 30
    llm = LLM(model, compile=True, block_size=BS, num_blocks=12, max_num_batched_tokens=24)
    assert llm.engine.runner._compiled_decode is None  # V4 decodes eagerly
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.blocks.num_free == llm.engine.pool.num_blocks
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _greedy_full(model, prompt, new)


def test_llm_greedy_in_blocks_of_four_windows(model):
    """Blocks of 64 = 4 x the window (the window kept at a block end is a quarter key per token): two rows decode
    across a block end from their running state alone, then a prompt extending row 0 hits its first block
    (the window rebuilt from that block's end); every output equals greedy decoding by the full forward."""
    from openr2.engine.llm import LLM
    from openr2.engine.sampling import SamplingParams

    gen = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (50, 29)]
    llm = LLM(model, compile=False, block_size=64, num_blocks=8, max_num_batched_tokens=32)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _greedy_full(model, prompt, 24)
    longer = prompts[0] + outs[0].outputs[0].token_ids
    again = llm.generate([longer], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert again.num_cached_tokens == 64 and again.outputs[0].token_ids == _greedy_full(model, longer, 10)


def test_speculative_decoding_is_refused(model):
    from openr2.engine.llm import LLM

    with pytest.raises(ValueError, match="not supported for DeepSeek-V4"):
        LLM(model, compile=False, block_size=BS, num_blocks=8, speculative_config={"method": "ngram",
                                                                                   "num_speculative_tokens": 2})


def test_llm_greedy_generation_equals_transformers_generate(tmp_path):
    """`LLM` over a V4 checkpoint transformers wrote (blocks of 16, prompt chunks of at most 24 tokens, two
    sequences at once) generates what transformers' `generate` does, 40 tokens past prompts of 61 (crossing
    window, CSA, HCA and cache blocks); then continuing row 0 from its prompt and first 20 tokens (a
    prefix-cache hit) still does."""
    from openr2.checkpoints import load_model
    from openr2.engine.llm import LLM
    from openr2.engine.sampling import SamplingParams
    from tests.hf_utils import hf_model
    from tests.numerics import FACTOR, max_abs_diff

    config = tiny_v4()
    hf = hf_model(config, seed=3)
    hf.save_pretrained(tmp_path)
    prompt = torch.randint(0, config.vocab_size, (2, 61), generator=torch.Generator().manual_seed(4))
    P, new = prompt.shape[1], 40
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    ours = load_model(tmp_path)
    assert_decided(ours, want, what="generated")
    with torch.no_grad():  # each greedy choice is far from the two models' difference
        logits, theirs = ours(want), hf(want).logits
    top2 = logits[:, P - 1 : -1].topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > FACTOR * max_abs_diff(logits, theirs)

    llm = LLM(str(tmp_path), compile=True, block_size=BS, max_num_batched_tokens=24, num_blocks=24)
    greedy = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt.tolist()], greedy)
    assert [o.outputs[0].token_ids for o in outs] == want[:, P:].tolist()
    again = llm.generate([{"prompt_token_ids": want[0, : P + 20].tolist()}],
                         SamplingParams(temperature=0, max_tokens=new - 20, ignore_eos=True))[0]
    assert again.num_cached_tokens >= 3 * BS and again.outputs[0].token_ids == want[0, P + 20 :].tolist()


def test_block_size_must_hold_whole_entries(model):
    from openr2.engine.llm import LLM

    with pytest.raises(ValueError, match="multiple of every compression rate"):
        LLM(model, compile=False, block_size=8, num_blocks=8)


def test_forked_samples_carry_the_running_state(model):
    """n=2 off a 45-token prompt (mid cache block, mid HCA block, one token past a CSA block): the second sample
    starts from the first's cache (full blocks shared, the partial one copied, the compressors' running state
    shared); both decode the full forward's greedy continuation."""
    from openr2.engine.llm import LLM
    from openr2.engine.sampling import SamplingParams

    prompt = torch.randint(0, model.config.vocab_size, (45,), generator=torch.Generator().manual_seed(5)).tolist()
    llm = LLM(model, compile=False, block_size=BS, num_blocks=16)
    out = llm.generate(prompt, SamplingParams(n=2, temperature=0, max_tokens=20, ignore_eos=True))[0]
    want = _greedy_full(model, prompt, 20)
    assert [o.token_ids for o in out.outputs] == [want, want]


def test_engine_default_block_size(model):
    from openr2.engine.engine import EngineConfig, LLMEngine
    from openr2.presets import v4_demo

    # the smallest multiple of the compression rates (lcm 16 / 128) >= 4 x the window (16 / 128)
    assert (V4Pool.default_block_size(tiny_v4()), V4Pool.default_block_size(v4_demo())) == (64, 512)
    assert LLMEngine(model, None, EngineConfig(num_blocks=4)).pool.block_size == 64
    assert LLMEngine(model, None, EngineConfig(num_blocks=4, block_size=BS)).pool.block_size == BS
