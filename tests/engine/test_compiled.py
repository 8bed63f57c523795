"""The compiled decode step (EngineConfig(compile=True)): the same tokens as the naive recompute loop under
chunked prefill, preemption and a changing batch (one row and several rows, both expert paths), the same
logits as the eager step, and a clean fall back to eager when torch.compile cannot take the model."""

from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch

from openr2.engine import compiled
from openr2.engine.engine import EngineConfig, LLMEngine
from openr2.engine.kv_cache import KVPool
from openr2.model.transformer import build_model
from openr2.presets import tiny_v3, tiny_v32
from tests.engine.test_engine import GREEDY, _naive_greedy, _prompts, _run
from tests.numerics import assert_close_to_reference, float64_compute, float64_copy


@pytest.fixture(scope="module")
def model():
    model = build_model(dataclasses.replace(tiny_v3(), num_nextn_predict_layers=0), seed=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + 1)) * 0.5)
    return model


@pytest.mark.slow
def test_compiled_decode_equals_naive_loop(model):
    prompts = _prompts([5, 9, 17, 23, 31, 40, 12, 3], seed=1)
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=24, max_num_batched_tokens=16,
                                                  compile=True))
    done = _run(engine, [(str(i), p, GREEDY) for i, p in enumerate(prompts)], add_every=2)
    assert engine.scheduler.num_preemptions > 0
    assert engine.runner._compiled_decode is not None  # it compiled, and stayed compiled
    for i, prompt in enumerate(prompts):
        assert done[str(i)].outputs[0].token_ids == _naive_greedy(model, prompt, GREEDY.max_tokens), i
    assert engine.blocks.num_free == engine.pool.num_blocks


def _decode_step64(model, ids, positions, pool_c, pool_r, *cache):
    """The eager step of a float64 copy of `model` on float64 pools (written in place): the reference."""
    with torch.inference_mode(), float64_compute():
        return compiled.decode_step(float64_copy(model), ids, positions, pool_c, pool_r, *cache)


def _filled_pool(model, num_blocks: int, block_size: int, gen: torch.Generator):
    shape = (model.config.num_hidden_layers, num_blocks * block_size)
    return (torch.randn(*shape, model.config.kv_lora_rank, generator=gen),
            torch.randn(*shape, model.config.qk_rope_head_dim, generator=gen))


def _step_args(model, lengths: list[int], num_blocks: int, block_size: int, gen: torch.Generator):
    """(ids, positions, block_table, write_slots, write_index) of one new token per row after `lengths` tokens,
    over shuffled blocks (the table as PagedView cuts it: at least two columns)."""
    width = max(2, -(-max(lengths) // block_size))
    table = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in lengths])
    positions = torch.tensor(lengths)[:, None] - 1
    write_slots = (table.gather(1, positions // block_size) * block_size + positions % block_size).flatten()
    ids = torch.randint(0, model.config.vocab_size, (len(lengths), 1), generator=gen)
    return ids, positions, table, write_slots, torch.arange(len(lengths))


@pytest.mark.slow
@pytest.mark.parametrize("rows,width", [(1, 1), (5, 1), (2, 2)])
def test_compiled_step_logits_equal_eager(model, rows, width):
    """One decode step over a filled pool, compiled (AOTInductor packages: one row; five rows of one token; two
    rows of two) vs eager, and the pool writes it makes: each within a small factor of
    the eager step's own float32 error against a float64 run of the step (tests/numerics.py: inductor fuses and reorders the sums, so the
    two float32 results differ by rounding that depends on the CPU and the thread count)."""
    gen = torch.Generator().manual_seed(rows)
    num_layers, block_size, num_blocks = model.config.num_hidden_layers, 4, 16
    pool_c = torch.randn(num_layers, num_blocks * block_size, model.config.kv_lora_rank, generator=gen)
    pool_r = torch.randn(num_layers, num_blocks * block_size, model.config.qk_rope_head_dim, generator=gen)
    lengths = torch.tensor([7, 12, 3, 9, 10][:rows])
    block_table = torch.stack([torch.randperm(num_blocks, generator=gen)[:3] for _ in range(rows)])
    positions = lengths[:, None] - width + torch.arange(width)  # a token and width - 1 drafts per row
    write_slots = (block_table.gather(1, positions // block_size) * block_size + positions % block_size).flatten()
    cache = (block_table, write_slots, torch.arange(rows * width))
    ids = torch.randint(0, model.config.vocab_size, (rows, width), generator=gen)
    args = (ids, positions)
    eager_c, eager_r, pool_c_before = pool_c.clone(), pool_r.clone(), pool_c.clone()
    ref_c, ref_r = pool_c.double(), pool_r.double()
    with torch.inference_mode():
        want = compiled.decode_step(model, *args, eager_c, eager_r, *cache, block_size)
        got = compiled.compiled_decode_step(model)(*args, pool_c, pool_r, *cache, block_size=block_size)
    assert compiled.compiled_decode_step(model)._runners[rows, width, block_size] is not False  # not torch.compile
    ref = _decode_step64(model, *args, ref_c, ref_r, *cache, block_size)
    for name, g, w, r in zip(("logits", "hidden"), got, want, ref):
        assert_close_to_reference(g, w, r, what=f"{name}, {rows} rows of {width}")
    assert_close_to_reference(pool_c, eager_c, ref_c, what="pool_c writes")
    assert_close_to_reference(pool_r, eager_r, ref_r, what="pool_r writes")
    assert not torch.equal(pool_c, pool_c_before)  # the step wrote its tokens into the pool
    # the compiled step reads the model's own weights: an in-place update (as GRPO's) is seen
    head = model.lm_head.weight
    original = head.detach().clone()
    try:
        with torch.no_grad():
            head.mul_(1.5)
        with torch.inference_mode():
            want = compiled.decode_step(model, *args, eager_c, eager_r, *cache, block_size)
            got = compiled.compiled_decode_step(model)(*args, pool_c, pool_r, *cache, block_size=block_size)
        ref = _decode_step64(model, *args, ref_c, ref_r, *cache, block_size)
        assert_close_to_reference(got[0], want[0], ref[0], what=f"logits after the head update, {rows} rows")
    finally:
        with torch.no_grad():
            head.copy_(original)


def test_greedy_accepted_counts_the_leading_drafts_equal_to_the_argmax():
    ids = torch.tensor([[5, 1, 2, 3], [5, 1, 9, 3], [5, 7, 2, 3]])
    assert compiled.greedy_accepted(ids, torch.tensor([[1, 2, 3, 4]] * 3)).tolist() == [3, 1, 0]
    assert compiled.greedy_accepted(ids[:, :1], ids[:, :1]).tolist() == [0, 0, 0]


def _decode_then_draft(model, ids, positions, pool_c, pool_r, block_table, write_slots, write_index, block_size):
    """The plain form of decode_draft_step: the decode step, then the MTP's whole block at every position
    (Transformer.draft), read at each row's greedy-accepted position."""
    logits, hidden = compiled.decode_step(model, ids, positions, pool_c, pool_r, block_table, write_slots,
                                          write_index, block_size)
    next_ids = logits.argmax(-1)
    accepted = compiled.greedy_accepted(ids, next_ids)
    view = compiled.DecodeView(pool_c, pool_r, block_table, write_slots, write_index, block_size)
    draft_logits, h = model.draft(hidden, next_ids, positions, view, 0, accepted, "absorbed", "decode", "compiled")
    return logits, hidden, next_ids, accepted, draft_logits.argmax(-1), h[torch.arange(len(ids)), accepted]


@pytest.mark.parametrize("rows,width,compile", [(2, 3, False), pytest.param(1, 2, True, marks=pytest.mark.slow),
                                                 pytest.param(3, 2, True, marks=pytest.mark.slow)])
def test_decode_draft_step_equals_decode_then_draft(rows, width, compile):
    """The decode step fused with the first MTP draft step (greedy verification and the MTP block at the
    accepted position only, in one call) against the decode step followed by the MTP's whole block: the
    same logits, argmax tokens, accepted counts, drafts and pool writes (MTP layer included); eager, and
    compiled (one row: a package; several: torch.compile)."""
    model = build_model(dataclasses.replace(tiny_v3(), num_nextn_predict_layers=1), seed=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + 2)) * 0.5)
    gen = torch.Generator().manual_seed(rows * width)
    L, block_size, num_blocks = model.config.num_hidden_layers + 1, 4, 16
    pool_c = torch.randn(L, num_blocks * block_size, model.config.kv_lora_rank, generator=gen)
    pool_r = torch.randn(L, num_blocks * block_size, model.config.qk_rope_head_dim, generator=gen)
    lengths = torch.tensor([7, 12, 3][:rows])
    block_table = torch.stack([torch.randperm(num_blocks, generator=gen)[:4] for _ in range(rows)])
    positions = lengths[:, None] - width + torch.arange(width)
    write_slots = (block_table.gather(1, positions // block_size) * block_size + positions % block_size).flatten()
    cache = (block_table, write_slots, torch.arange(rows * width), block_size)
    ids = torch.randint(0, model.config.vocab_size, (rows, width), generator=gen)
    with torch.inference_mode():  # row 0's first draft is the argmax token: accepted
        ids[0, 1] = compiled.decode_step(model, ids, positions, pool_c.clone(), pool_r.clone(), *cache)[0][0, 0].argmax()
        plain_c, plain_r, fast_c, fast_r = pool_c.clone(), pool_r.clone(), pool_c.clone(), pool_r.clone()
        plain = _decode_then_draft(model, ids, positions, plain_c, plain_r, *cache)
        if compile:
            step = compiled.CompiledStep(model, compiled.decode_draft_step, (2, 3), 4, cache_dir=None) \
                if rows == 1 else compiled._private_compile(compiled.decode_draft_step)
            fast = step(ids, positions, fast_c, fast_r, *cache[:-1], block_size=block_size) if rows == 1 else \
                step(model, ids, positions, fast_c, fast_r, *cache)
        else:
            fast = compiled.decode_draft_step(model, ids, positions, fast_c, fast_r, *cache)
    with torch.inference_mode(), float64_compute():
        ref_c, ref_r = pool_c.double(), pool_r.double()
        ref = _decode_then_draft(float64_copy(model), ids, positions, ref_c, ref_r, *cache)
    assert plain[3][0] >= 1
    for i, name in ((2, "next ids"), (3, "accepted"), (4, "drafts")):
        assert torch.equal(fast[i], plain[i]), name
    for i, name in ((0, "logits"), (1, "hidden"), (5, "MTP block output")):
        assert_close_to_reference(fast[i], plain[i], ref[i], what=f"{name}, {rows} rows of {width}")
    assert_close_to_reference(fast_c, plain_c, ref_c, what="pool_c writes")
    assert_close_to_reference(fast_r, plain_r, ref_r, what="pool_r writes")


@pytest.mark.slow
def test_several_rows_packages_serve_their_ranges_and_reload(model):
    """Several rows run through AOTInductor packages exported once per range of rows (the experts' "few pairs"
    branch splits this model's at 4): every batch size from 2 to 16, at short and long contexts, over tables
    and pools of other sizes than the ones exported, gives the eager step's logits and pool writes; a second
    CompiledStep (a restart: nothing in memory) loads the same packages from disk and agrees at new shapes."""
    gen = torch.Generator().manual_seed(11)
    block_size = 4
    step = compiled.CompiledStep(model, compiled.decode_step, (2, 3), 4)
    for rows, num_blocks in [(2, 8), (3, 32), (4, 12), (5, 16), (9, 40), (16, 20)]:
        lengths = torch.randint(1, num_blocks * block_size // 2, (rows,), generator=gen).tolist()
        if rows == 3:
            lengths[1] = num_blocks * block_size  # a row as long as the pool: every block in its table
        pool_c, pool_r = _filled_pool(model, num_blocks, block_size, gen)
        args = _step_args(model, lengths, num_blocks, block_size, gen)
        eager_c, eager_r, ref_c, ref_r = pool_c.clone(), pool_r.clone(), pool_c.double(), pool_r.double()
        cache = args[2:]
        with torch.inference_mode():
            want = compiled.decode_step(model, *args[:2], eager_c, eager_r, *cache, block_size)
            got = step(*args[:2], pool_c, pool_r, *cache, block_size=block_size)
        ref = _decode_step64(model, *args[:2], ref_c, ref_r, *cache, block_size)
        for name, g, w, r in zip(("logits", "hidden"), got, want, ref):
            assert_close_to_reference(g, w, r, what=f"{name}, {rows} rows, lengths {lengths}")
        assert_close_to_reference(pool_c, eager_c, ref_c, what=f"pool_c writes, {rows} rows")
    assert step._multi is None  # no torch.compile: packages served every batch
    ranges = sorted((p.lo, p.hi) for p in step._packages[1, block_size])
    assert ranges[0][0] == 2 and ranges[-1][1] >= 16 and len(ranges) < 15  # a few packages cover 2..16 rows
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))  # ranges that neither overlap nor leave gaps

    restarted = compiled.CompiledStep(model, compiled.decode_step, (2, 3), 4)
    for rows, num_blocks in [(4, 64), (13, 8)]:
        lengths = torch.randint(1, num_blocks * block_size, (rows,), generator=gen).tolist()
        pool_c, pool_r = _filled_pool(model, num_blocks, block_size, gen)
        args = _step_args(model, lengths, num_blocks, block_size, gen)
        eager_c, eager_r = pool_c.clone(), pool_r.clone()
        with torch.inference_mode():
            want = compiled.decode_step(model, *args[:2], eager_c, eager_r, *args[2:], block_size)[0]
            got = restarted(*args[:2], pool_c, pool_r, *args[2:], block_size=block_size)[0]
        ref = _decode_step64(model, *args[:2], pool_c.double(), pool_r.double(), *args[2:], block_size)[0]
        assert_close_to_reference(got, want, ref, what=f"after a reload, {rows} rows")
    assert (restarted.num_loaded, restarted.num_built) == (2, 0) and restarted._multi is None


@pytest.mark.slow
@pytest.mark.parametrize("read", ["blocks", "gather"])
def test_compiled_step_with_multi_token_rows(model, read):
    """Rows carrying 3, 1 and 2 new tokens (padded to 3) and a padding row with none, over shuffled blocks:
    the compiled step (torch.compile; one graph for any rows x tokens) gives the eager step's logits at every
    position and the same pool writes, the padding written nowhere; the in-place read and the gather
    reference alike."""
    gen = torch.Generator().manual_seed(7)
    pool = KVPool(model.config, num_blocks=16, block_size=4)
    pool.c_kv.normal_(generator=gen)
    pool.k_rope.normal_(generator=gen)
    tables = [torch.randperm(16, generator=gen)[:n].tolist() for n in (3, 4, 2)] + [[]]
    computed, num_new = [7, 12, 3, 0], [3, 1, 2, 0]
    view = pool.view(tables, computed, num_new)
    T = 3
    ids = torch.randint(0, model.config.vocab_size, (4, T), generator=gen)
    positions = torch.tensor([[c + min(t, max(n - 1, 0)) for t in range(T)] for c, n in zip(computed, num_new)])
    _, _, *cache = view.decode_args()
    eager_c, eager_r, ref_c, ref_r = pool.c_kv.clone(), pool.k_rope.clone(), pool.c_kv.double(), pool.k_rope.double()
    with torch.inference_mode():
        want = compiled.decode_step(model, ids, positions, eager_c, eager_r, *cache, read=read)[0]
        got = compiled._private_compile(compiled.decode_step)(model, ids, positions, pool.c_kv, pool.k_rope, *cache,
                                                                read=read)[0]
    ref = _decode_step64(model, ids, positions, ref_c, ref_r, *cache)[0]
    assert got.shape == (4, T, model.config.vocab_size)
    assert_close_to_reference(got, want, ref, what=f"logits of multi-token rows ({read})")
    assert_close_to_reference(pool.c_kv, eager_c, ref_c, what="pool_c writes")
    written = (eager_c != ref_c.float()).any(-1).any(0).nonzero().flatten()  # slots the step wrote
    assert sorted(written.tolist()) == sorted(view.write_slots.tolist()) and len(written) == sum(num_new)


@pytest.mark.slow
def test_one_row_packages_per_width(model, tmp_path):
    """A one-row step of 3 new tokens (a row verifying 2 drafts) through the AOTInductor package exported
    for that width: the eager step's logits and writes; a one-token row then gets a package of its own."""
    gen = torch.Generator().manual_seed(8)
    pool = KVPool(model.config, num_blocks=8, block_size=4)
    pool.c_kv.normal_(generator=gen)
    pool.k_rope.normal_(generator=gen)
    view = pool.view([[5, 2, 7]], [6], [3])
    ids = torch.randint(0, model.config.vocab_size, (1, 3), generator=gen)
    positions = torch.arange(6, 9)[None]
    _, _, *cache = view.decode_args()
    eager_c, eager_r, ref_c, ref_r = pool.c_kv.clone(), pool.k_rope.clone(), pool.c_kv.double(), pool.k_rope.double()
    step = compiled.CompiledStep(model, compiled.decode_step, (2, 3), 4, str(tmp_path))  # fresh: no packages yet
    with torch.inference_mode():
        want = compiled.decode_step(model, ids, positions, eager_c, eager_r, *cache)[0]
        got = step(ids, positions, pool.c_kv, pool.k_rope, *cache[:-1], block_size=4)[0]
    assert step.num_packages == 1
    ref = _decode_step64(model, ids, positions, ref_c, ref_r, *cache)[0]
    assert_close_to_reference(got, want, ref, what="one row, 3 new tokens (package)")
    assert_close_to_reference(pool.c_kv, eager_c, ref_c, what="pool_c writes")
    one = pool.view([[5, 2, 7]], [9], [1])
    *one_cache, _ = one.decode_args()[2:]
    with torch.inference_mode():
        got = step(ids[:, :1], torch.tensor([[9]]), pool.c_kv, pool.k_rope, *one_cache, block_size=4)[0]
        want = compiled.decode_step(model, ids[:, :1], torch.tensor([[9]]), eager_c, eager_r, *one.decode_args()[2:])[0]
    assert step.num_packages == 2
    assert_close_to_reference(got, want, _decode_step64(model, ids[:, :1], torch.tensor([[9]]), ref_c, ref_r,
                                                        *one.decode_args()[2:])[0], what="then one token (package)")


def test_falls_back_to_eager_when_compile_fails(model, monkeypatch):
    def unsupported(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("cannot trace this model")

    monkeypatch.setattr(compiled, "compiled_decode_step", lambda model, cache_dir=None: unsupported)
    prompt = _prompts([6], seed=2)[0]
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=8, compile=True))
    with pytest.warns(UserWarning, match="compiled decode unavailable"):
        done = _run(engine, [("a", prompt, GREEDY)])
    assert engine.runner._compiled_decode is None
    assert done["a"].outputs[0].token_ids == _naive_greedy(model, prompt, GREEDY.max_tokens)


@pytest.mark.slow
def test_warm_up_compiles_both_shapes_and_leaves_the_engine_clean(model):
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=16, compile=True))
    engine.warm_up()
    decode = engine.runner._compiled_decode
    assert decode is not None and decode.num_packages >= 2  # one row, and several
    assert all(decode.covers(rows, 1, 8) for rows in range(1, compiled.COMPILED_DECODE_MAX_TOKENS + 1))
    assert engine.runner.uncompiled_rows(compiled.COMPILED_DECODE_MAX_TOKENS) is None
    assert not engine.requests and engine.blocks.num_free == engine.pool.num_blocks
    assert not engine.blocks.block_of  # no warm-up prefix stays cached
    prompt = _prompts([6], seed=3)[0]
    assert _run(engine, [("a", prompt, GREEDY)])["a"].usage.cached_prompt_tokens == 0


@pytest.mark.slow
def test_int8_model_compiles_and_matches_eager(model):
    """int8 weights in the compiled step (dequantized inside the fused kernels): the eager quantized model's
    tokens, one row and several."""
    from openr2.quant.checkpoint import quantize_model

    quantized = build_model(model.config, seed=1).eval()
    quantized.load_state_dict(model.state_dict())
    quantize_model(quantized, "int8")
    prompts = _prompts([6, 11, 3], seed=4)
    requests = [(str(i), p, GREEDY) for i, p in enumerate(prompts)]
    compiled_engine = LLMEngine(quantized, config=EngineConfig(block_size=8, num_blocks=16, compile=True))
    eager_engine = LLMEngine(quantized, config=EngineConfig(block_size=8, num_blocks=16))
    for batch in (requests[:1], requests):
        got, want = _run(compiled_engine, batch), _run(eager_engine, batch)
        assert compiled_engine.runner._compiled_decode is not None
        for rid, _, _ in batch:
            assert got[rid].outputs[0].token_ids == want[rid].outputs[0].token_ids, rid


def test_int4_models_decode_eagerly():
    from openr2.presets import tiny_v2
    from openr2.quant.checkpoint import quantize_model

    quantized = build_model(tiny_v2(), seed=1).eval()  # widths that int4 groups of 32 divide
    quantize_model(quantized, "int4", group_size=32)
    with pytest.warns(UserWarning, match="int4 and fp8 models decode eagerly"):
        engine = LLMEngine(quantized, config=EngineConfig(block_size=8, num_blocks=8, compile=True))
    assert engine.runner._compiled_decode is None


@pytest.mark.slow
def test_a_restart_loads_the_compiled_steps_from_disk(model, tmp_path):
    """A second engine (a fresh process's model object) loads the packages the first compiled, for one row and
    several: no compiling. A corrupt package is never used: named in a warning, compiled again; one another torch
    wrote is pruned when an engine starts, and compiled again."""
    import copy
    import json

    config = EngineConfig(block_size=8, num_blocks=16, max_num_seqs=4, compile=True, compile_cache_dir=str(tmp_path))
    first = LLMEngine(copy.deepcopy(model), config=config)  # not the fixture: its steps are compiled already
    first.warm_up()
    assert first.runner._compiled_decode.num_built == 2  # one row; 2..4 rows (max_num_seqs 4)
    assert all(os.stat(p).st_mode & 0o077 == 0 for p in tmp_path.iterdir())  # owner-only files
    restarted = copy.deepcopy(model)  # another model object: nothing shared in memory
    second = LLMEngine(restarted, config=config)
    second.warm_up()  # (how long a restart takes is measured by bench/restart.py, not asserted here)
    decode = second.runner._compiled_decode
    assert (decode.num_loaded, decode.num_built) == (2, 0)
    prompts = _prompts([6, 9, 4], seed=4)
    done = _run(second, [(str(i), p, GREEDY) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        assert done[str(i)].outputs[0].token_ids == _naive_greedy(model, prompt, GREEDY.max_tokens), i
    assert decode._multi is None  # several rows ran through their package too

    one_row, several = sorted(tmp_path.glob("decode_step-*.pt2"), key=lambda p: json.loads(
        p.with_suffix(".json").read_text())["rows"][0])
    data = bytearray(one_row.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the package
    one_row.write_bytes(bytes(data))
    manifest = json.loads(several.with_suffix(".json").read_text())
    manifest["key"]["torch"] = "1.0"  # as if written by another torch
    several.with_suffix(".json").write_text(json.dumps(manifest))
    third = LLMEngine(copy.deepcopy(model), config=config)
    with pytest.warns(UserWarning) as caught:
        third.warm_up()
    messages = [str(w.message) for w in caught if "cached compiled step not used" in str(w.message)]
    assert any(str(one_row) in m and "sha256" in m for m in messages), messages
    # the other torch's package went when the engine started (engine/compile_cache.prune), so it is built again
    assert not any(str(several) in m for m in messages), messages
    decode = third.runner._compiled_decode
    assert (decode.num_loaded, decode.num_built) == (0, 2)
    done = _run(third, [(str(i), p, GREEDY) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        assert done[str(i)].outputs[0].token_ids == _naive_greedy(model, prompt, GREEDY.max_tokens), i
    assert json.loads(several.with_suffix(".json").read_text())["key"]["torch"] == torch.__version__  # rebuilt


@pytest.mark.slow
def test_sparse_attention_decode_step_compiles_and_equals_eager(tmp_path):
    """DeepSeek-V3.2 (tiny, top-8): one decode step of three rows, two of whose contexts (60, 33 keys) the
    indexer cuts to 8 and one (6 keys) it keeps whole, compiled into an AOTInductor package (the in-place
    indexer scan an opaque op in it) vs the same step eager, logits and the pools' writes (indexer keys
    included) against a float64 run. The eager step's float32 selections are the float64 run's with margin
    (tests/dsa.py), so no float32 implementation's rounding can change them."""
    from tests.dsa import assert_selection_decided
    from tests.hf_utils import perturb_

    config = dataclasses.replace(tiny_v32(), num_nextn_predict_layers=0)
    model = build_model(config, seed=5)
    perturb_(model, seed=5, scale=0.5)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    bs, num_blocks, lengths = 8, 24, [60, 5, 33]
    pool = KVPool(config, num_blocks, bs)
    for t in (pool.c_kv, pool.k_rope, pool.k_index):
        t.normal_(generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    view = pool.view([[free.pop() for _ in range(-(-(n + 1) // bs))] for n in lengths], lengths, [1] * 3)
    ids = torch.randint(0, config.vocab_size, (3, 1), generator=gen)
    positions = torch.tensor(lengths)[:, None]
    table, write_slots, write_index = view.decode_args()[2:5]
    pools = (pool.c_kv, pool.k_rope, pool.k_index)
    eager, ref = [t.clone() for t in pools], [t.double() for t in pools]
    seen: dict[str, list[torch.Tensor]] = {"32": [], "64": []}
    scores = compiled.DecodeView.index_scores

    def run(m, p, record):
        def recording(self, *args):
            out = scores(self, *args)
            seen[record].append(out)
            return out

        compiled.DecodeView.index_scores = recording
        try:
            with torch.inference_mode():
                return compiled.decode_step(m, ids, positions, p[0], p[1], table, write_slots, write_index, bs,
                                            pool_k=p[2])
        finally:
            compiled.DecodeView.index_scores = scores

    want = run(model, eager, "32")
    with float64_compute():
        want64 = run(float64_copy(model), ref, "64")
    assert_selection_decided(seen["32"], seen["64"], config.index_topk, what="compiled sparse step")
    index_before = pool.k_index.clone()
    step = compiled.CompiledStep(model, compiled.decode_step, (2, 3, 7), 4, str(tmp_path), index_arg=7)
    with torch.inference_mode():
        got = step(ids, positions, *pools[:2], table, write_slots, write_index, pools[2], block_size=bs)
    assert step.num_built == 1 and step.num_packages == 1  # exported: the indexer scan runs inside AOTInductor
    for name, g, w, r in zip(("logits", "hidden"), got, want, want64):
        assert_close_to_reference(g, w, r, what=f"sparse step {name}")
    for name, g, w, r in zip(("c_kv", "k_rope", "k_index"), pools, eager, ref):
        assert_close_to_reference(g, w, r, what=f"sparse step {name} writes")
    assert not torch.equal(pool.k_index, index_before)  # the step wrote its tokens' indexer keys


@pytest.mark.slow
def test_a_64_dim_rope_exports_and_matches_eager(tmp_path):
    """V3's 64 rope dims (32 inverse frequencies): the one-row decode step exports to a package on disk and gives
    the eager step's logits and pool writes. (The frequencies were a plain tensor attribute: inductor inlines a
    tensor of up to 8 values, but captured this one as a constant the package's loader was never given, and the
    step fell back to torch.compile.)"""
    config = dataclasses.replace(tiny_v3(), num_nextn_predict_layers=0, qk_rope_head_dim=64)
    model = build_model(config, seed=2).eval()
    gen = torch.Generator().manual_seed(12)
    pool_c, pool_r = _filled_pool(model, 8, 4, gen)
    args = _step_args(model, [13], 8, 4, gen)
    eager_c, eager_r, ref_c, ref_r = pool_c.clone(), pool_r.clone(), pool_c.double(), pool_r.double()
    step = compiled.CompiledStep(model, compiled.decode_step, (2, 3), 4, str(tmp_path))
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not exported.*")
        got = step(*args[:2], pool_c, pool_r, *args[2:], block_size=4)
        want = compiled.decode_step(model, *args[:2], eager_c, eager_r, *args[2:], 4)
    assert (step.num_packages, step.num_built) == (1, 1) and step._multi is None
    assert len(list(tmp_path.glob("decode_step-*.pt2"))) == 1 and len(list(tmp_path.glob("decode_step-*.json"))) == 1
    ref = _decode_step64(model, *args[:2], ref_c, ref_r, *args[2:], 4)
    for name, g, w, r in zip(("logits", "hidden"), got, want, ref):
        assert_close_to_reference(g, w, r, what=f"{name}, rope 64")
    assert_close_to_reference(pool_r, eager_r, ref_r, what="pool_r writes, rope 64")


def test_a_package_reading_a_tensor_the_model_lacks_names_it(monkeypatch):
    """A package whose constants are not all the model's parameters and buffers is refused with their names (the
    engine's fall-back warning quotes it), not with a bare KeyError."""
    from openr2.engine import aoti

    class Loader:
        def __init__(self, *args):
            pass

        def get_constant_fqns(self):
            return ["model.norm.weight", "_tensor_constant0"]

        def load_constants(self, *args):
            raise AssertionError("loaded with a constant missing")

    monkeypatch.setattr(torch._C._aoti, "AOTIModelPackageLoader", Loader)
    with pytest.raises(ValueError, match="not the model's parameters or buffers: _tensor_constant0 "):
        aoti._load("step.pt2", {"model.norm.weight": torch.ones(2)})


@pytest.mark.parametrize("variant", ["rope 64", "no YaRN, rope 18", "V2-shaped", "int8", "MTP decode+draft"])
def test_exported_steps_read_only_the_models_parameters_and_buffers(variant):
    """Export alone (seconds, no build): every tensor the decode step reads is a parameter or buffer of the
    model, so its package's loader is given all of them. A lifted tensor constant (a plain tensor attribute, as
    the rope frequencies were) would reach AOTInductor as a constant of its own, which it inlines only up to 8
    values: larger ones fail to load and the step falls back to torch.compile."""
    from openr2.presets import tiny_v2

    base = dataclasses.replace(tiny_v3(), num_nextn_predict_layers=0, qk_rope_head_dim=64)
    config = {"no YaRN, rope 18": dataclasses.replace(base, qk_rope_head_dim=18, rope_scaling=None),
              "V2-shaped": dataclasses.replace(tiny_v2(), qk_rope_head_dim=64),
              "MTP decode+draft": dataclasses.replace(base, num_nextn_predict_layers=1)}.get(variant, base)
    model = build_model(config, seed=1).eval()
    if variant == "int8":
        from openr2.quant.checkpoint import quantize_model

        quantize_model(model, "int8")
    fn = compiled.decode_draft_step if variant == "MTP decode+draft" else compiled.decode_step
    gen = torch.Generator().manual_seed(3)
    layers = config.num_hidden_layers + config.num_nextn_predict_layers  # the MTP module's keys too
    pool_c, pool_r = (torch.randn(layers, 32, width, generator=gen) for width in (config.kv_lora_rank,
                                                                                  config.qk_rope_head_dim))
    ids, positions, *cache = _step_args(model, [13, 6], 8, 4, gen)
    compiled.paged_attention.load()
    module = compiled._Step(model, fn, {"block_size": 4})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = torch.export.export(module, (ids, positions, pool_c, pool_r, *cache), strict=False)
    given = dict(module.named_parameters()) | dict(module.named_buffers())
    constants = program.graph_signature.lifted_tensor_constants
    assert not constants, f"the step reads tensors that are neither parameters nor buffers: {constants}"
    read = set(program.graph_signature.parameters) | set(program.graph_signature.buffers)
    assert read <= set(given) and "model.rotary.inv_freq" in read


def test_a_step_reading_a_plain_tensor_attribute_is_refused_before_building(tmp_path):
    """Export lifts a plain tensor attribute as a constant; one of more than 8 values would be a constant of the
    package's own that its loader is never given: build refuses it right after export, naming it, and writes
    nothing. Up to 8 values inductor inlines (then it exports, as rope dims up to 16 did)."""
    from openr2.engine import aoti

    class Step(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.freq = torch.arange(n, dtype=torch.float32)  # a plain attribute, as the rope frequencies were

        def forward(self, *args):  # as _Step's: (x, pool, table, write slots, write index)
            x, pool, table, slots, index = args
            return x * self.freq + pool[0, :1].sum() + table.sum() + slots.sum() + index.sum()

    def example(n):
        return torch.ones(1, n), torch.ones(2, 4, n), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long), \
            torch.zeros(1, dtype=torch.long)

    with pytest.raises(ValueError, match=r"not the model's parameters or buffers: freq \(32,\)"):
        aoti.build(str(tmp_path), "step", {}, Step(32), example(32), (1,), 2, 1, {})
    assert not any(tmp_path.iterdir())
    program = torch.export.export(Step(8), example(8), strict=False)
    assert program.graph_signature.lifted_tensor_constants  # lifted, but inlined by inductor
    aoti._check_constants(program)
