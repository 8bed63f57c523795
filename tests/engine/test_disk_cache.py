"""The disk tier of prefix caching (engine/disk_cache.py) on the three pool kinds (MLA, V3.2's indexer keys, V4's
pool): each pool's export/import round trip; a new engine on the same directory (a restart) loads a prompt's
blocks instead of prefilling them, bills them as cached and generates what a cold run does; corrupt, torn,
misplaced files are misses; tenants and models never read each other's blocks; the size cap evicts the least
recently used files; files are the owner's only."""

from __future__ import annotations

import dataclasses
import os
import stat

import pytest
import torch

from openr2.engine.disk_cache import BlockLayout, DiskCache, model_fingerprint
from openr2.engine.engine import EngineConfig, LLMEngine
from openr2.engine.prefix_cache import chain_hashes
from openr2.engine.sampling import SamplingParams
from openr2.model.transformer import build_model
from openr2.presets import tiny_v3, tiny_v4, tiny_v32
from tests.hf_utils import perturb_

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
BS = 16  # a multiple of tiny_v4's compression rates (4, 16), as long as its window


def _model(kind: str, seed: int = 0):
    config = {"mla": tiny_v3, "v32": tiny_v32, "v4": tiny_v4}[kind]()
    if config.num_nextn_predict_layers:
        config = dataclasses.replace(config, num_nextn_predict_layers=0)
    model = build_model(config, seed=seed)
    perturb_(model, seed=7 + seed, scale=0.3 if kind != "v4" else 0.1)  # clear-cut greedy choices
    return model.eval()


@pytest.fixture(scope="module", params=["mla", "v32", "v4"])
def model(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def mla():
    return _model("mla")


def _engine(model, cache_dir, **kw):
    return LLMEngine(model, config=EngineConfig(block_size=BS, num_blocks=kw.pop("num_blocks", 24),
                                                max_num_batched_tokens=kw.pop("chunk", 32),
                                                cache_dir=str(cache_dir) if cache_dir else None, **kw))


def _generate(engine, prompt, salt=None, params=GREEDY):
    *_, out = engine.stream({"prompt_token_ids": prompt}, params, salt=salt)
    return out


def _prompt(n, seed=1, vocab=256):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_each_pool_exports_and_imports_its_blocks(model):
    """export_blocks -> import_blocks into other blocks: every tensor of those blocks equal, the rest untouched."""
    engine = _engine(model, None)
    pool = engine.pool
    for t in pool.export_blocks(list(range(pool.num_blocks))).values():
        assert t.shape[0] == pool.num_blocks
    before = pool.export_blocks(list(range(pool.num_blocks)))
    src = {name: torch.randn(t[:3].shape).to(t.dtype) for name, t in before.items()}
    pool.import_blocks([5, 2, 9], src)
    after = pool.export_blocks(list(range(pool.num_blocks)))
    for name, t in after.items():
        assert torch.equal(t[[5, 2, 9]], src[name]), name
        keep = [b for b in range(pool.num_blocks) if b not in (5, 2, 9)]
        assert torch.equal(t[keep], before[name][keep]), name
    layout = BlockLayout.of(pool)
    assert layout.nbytes * pool.num_blocks == pool.nbytes  # a block's file holds all the pool keeps for it


def test_a_restart_loads_the_prefix_from_disk(model, tmp_path):
    """Engine A (memory and disk tiers) answers a prompt cold, then from memory; engine B, new on the same
    directory, loads the full blocks from disk: billed as cached, the same greedy tokens."""
    prompt = _prompt(90)
    a = _engine(model, tmp_path)
    cold = _generate(a, prompt)
    warm = _generate(a, prompt)
    a.blocks.disk.cache.flush()
    assert cold.usage.cached_prompt_tokens == 0 and warm.usage.cached_prompt_tokens == 80
    assert a.blocks.disk.cache.stats.written >= 90 // BS
    b = _engine(model, tmp_path)
    again = _generate(b, prompt)
    assert again.usage.cached_prompt_tokens == 80  # five blocks; the block of the last token is computed
    assert b.blocks.disk.cache.stats.hits == 5
    assert again.outputs[0].token_ids == warm.outputs[0].token_ids == cold.outputs[0].token_ids
    reference = _generate(_engine(model, None), prompt)  # no disk tier at all
    assert again.outputs[0].token_ids == reference.outputs[0].token_ids
    # a longer prompt over the same prefix: the disk blocks, then the rest computed (chunked)
    longer = prompt + _prompt(40, seed=2)
    c = _engine(model, tmp_path)
    out = _generate(c, longer)
    assert out.usage.cached_prompt_tokens == 80
    assert out.outputs[0].token_ids == _generate(_engine(model, None), longer).outputs[0].token_ids


def test_memory_and_disk_hits_interleave(mla, tmp_path):
    """A chain whose middle block was evicted from memory: memory hits, then the disk's block, then memory
    again; the pool too small to hold the whole prefix loads what fits beside the step's chunk."""
    prompt = _prompt(100, seed=3)
    a = _engine(mla, tmp_path)
    cold = _generate(a, prompt)
    a.blocks.disk.cache.flush()
    blocks = a.blocks
    hashes = chain_hashes(prompt, BS, None, 6)
    victim = blocks.block_of[hashes[2]]  # evict block 2 of the chain from memory only
    blocks.evictable.pop(victim)
    del blocks.block_of[hashes[2]]
    blocks.hash_of[victim] = None
    blocks.free.append(victim)
    out = _generate(a, prompt)
    assert out.usage.cached_prompt_tokens == 96 and a.blocks.disk.cache.stats.hits == 1
    assert out.outputs[0].token_ids == cold.outputs[0].token_ids
    # a pool of 9 blocks, 4 of them held by another request: the disk loads what leaves room for a chunk
    small = _engine(mla, tmp_path, num_blocks=9, chunk=16)
    other = _prompt(40, seed=9)
    small.add_request("other", other, GREEDY)
    small.step()
    small.add_request("again", prompt, GREEDY)
    done = {}
    while small.has_unfinished_requests():
        done |= {o.request_id: o for o in small.step() if o.finished}
    assert done["again"].outputs[0].token_ids == cold.outputs[0].token_ids
    assert 0 < done["again"].usage.cached_prompt_tokens < 96  # what fitted; the rest computed
    assert done["other"].outputs[0].token_ids == _generate(_engine(mla, None), other).outputs[0].token_ids


def test_corrupt_torn_or_misplaced_files_are_misses(mla, tmp_path):
    prompt = _prompt(90, seed=4)
    a = _engine(mla, tmp_path)
    cold = _generate(a, prompt)
    cache = a.blocks.disk.cache
    cache.flush()
    files = [cache.file_of(h) for h in chain_hashes(prompt, BS, None, 5)]
    with open(files[3], "r+b") as f:  # one flipped byte inside a tensor
        f.seek(os.path.getsize(files[3]) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    b = _engine(mla, tmp_path)
    out = _generate(b, prompt)
    assert out.usage.cached_prompt_tokens == 3 * BS and b.blocks.disk.cache.stats.corrupt == 1
    assert out.outputs[0].token_ids == cold.outputs[0].token_ids
    b.blocks.disk.cache.flush()  # the corrupt file was deleted and this run wrote the block again
    assert b.blocks.disk.cache.stats.written == 1  # block 3 (block 4 is on disk: not written twice)
    os.truncate(files[1], os.path.getsize(files[1]) - 100)  # torn: a crash mid-write without the rename
    os.replace(files[0], files[2])  # a valid file under another block's name
    c = _engine(mla, tmp_path)
    out = _generate(c, prompt)
    assert out.usage.cached_prompt_tokens == 0 and c.blocks.disk.cache.stats.corrupt == 0  # block 0: no file
    assert out.outputs[0].token_ids == cold.outputs[0].token_ids
    d = _engine(mla, tmp_path)
    assert d.blocks.disk.read(chain_hashes(prompt, BS, None, 5))[0] == 1  # c wrote block 0 again; 1 is torn
    stats = d.blocks.disk.cache.stats
    assert stats.hits == 1 and stats.corrupt == 1  # block 1 torn
    for h, path in zip(chain_hashes(prompt, BS, None, 5)[2:3], files[2:3]):
        assert d.blocks.disk.cache.get(h) is None and not os.path.exists(path)  # block 0's bytes under 2's name


def test_tenants_and_models_never_share_blocks(mla, tmp_path):
    prompt = _prompt(70, seed=5)
    a = _engine(mla, tmp_path)
    _generate(a, prompt, salt="tenant-a")
    a.blocks.disk.cache.flush()
    b = _engine(mla, tmp_path)
    assert _generate(b, prompt, salt="tenant-b").usage.cached_prompt_tokens == 0
    assert _generate(b, prompt).usage.cached_prompt_tokens == 0  # no salt is a tenant of its own
    c = _engine(mla, tmp_path)
    assert _generate(c, prompt, salt="tenant-a").usage.cached_prompt_tokens == 64
    other = _model("mla", seed=1)  # same config, other weights
    assert model_fingerprint(other) != model_fingerprint(mla)
    d = _engine(other, tmp_path)
    assert _generate(d, prompt, salt="tenant-a").usage.cached_prompt_tokens == 0
    assert d.blocks.disk.cache.stats.hits == 0 and d.blocks.disk.cache.namespace != c.blocks.disk.cache.namespace
    # the same weights in another cache dtype: another layout, another namespace
    e = LLMEngine(_model("mla").to(torch.bfloat16), config=EngineConfig(block_size=BS, num_blocks=24,
                                                                         cache_dir=str(tmp_path)))
    assert _generate(e, prompt, salt="tenant-a").usage.cached_prompt_tokens == 0
    # a weight update in place (reset_prefix_cache): the disk's old blocks are not served either
    f = _engine(_model("mla"), tmp_path)
    with torch.no_grad():
        f.model.embed_tokens.weight.mul_(1.01)
    f.reset_prefix_cache()
    assert _generate(f, prompt, salt="tenant-a").usage.cached_prompt_tokens == 0


def test_size_cap_evicts_least_recently_used_files(mla, tmp_path):
    engine = _engine(mla, None)
    layout = BlockLayout.of(engine.pool)
    block = engine.pool.export_blocks([0])
    one = {k: v[0] for k, v in block.items()}
    probe = DiskCache(str(tmp_path / "probe"), 1 << 30, layout, b"x" * 16)
    probe.put(b"h" * 16, one)
    probe.flush()
    size = probe.total_bytes
    cache = DiskCache(str(tmp_path / "cap"), 4 * size, layout, b"x" * 16)
    keys = [bytes([i]) * 16 for i in range(6)]
    for k in keys[:4]:
        assert cache.put(k, one)
    cache.flush()
    assert cache.get(keys[0]) is not None  # used: now the most recent
    for k in keys[4:]:
        cache.put(k, one)
    cache.flush()
    assert cache.total_bytes <= 4 * size and cache.stats.evicted == 2
    present = [cache.get(k) is not None for k in keys]
    assert present == [True, False, False, True, True, True]
    # the order survives a restart (a load touches the file)
    again = DiskCache(str(tmp_path / "cap"), 4 * size, layout, b"x" * 16)
    assert again.total_bytes == 4 * size
    os.utime(again.file_of(keys[3]), (1, 1))  # the oldest on disk
    again = DiskCache(str(tmp_path / "cap"), 4 * size, layout, b"x" * 16)
    again.put(b"z" * 16, one)
    again.flush()
    assert again.get(keys[3]) is None and again.get(keys[0]) is not None
    with pytest.raises(ValueError, match="cache_dir_bytes"):
        DiskCache(str(tmp_path / "cap"), 0, layout, b"x" * 16)


def test_files_are_the_owners_only_and_written_whole(mla, tmp_path):
    a = _engine(mla, tmp_path / "dir")
    _generate(a, _prompt(40, seed=6))
    a.blocks.disk.cache.flush()
    assert stat.S_IMODE(os.stat(tmp_path / "dir").st_mode) == 0o700
    names = []
    for root, dirs, files in os.walk(tmp_path / "dir"):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o600
            names.append(f)
    assert len(names) == (40 + 12) // BS and all(n.endswith(".blk") for n in names)  # no temporary files left
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        _engine(mla, tmp_path, enable_prefix_caching=False)


def test_cli_has_the_disk_tier_flags():
    from openr2.cli import _engine_config, build_parser

    args = build_parser().parse_args(["serve", "--model", "m", "--cache-dir", "/x", "--cache-dir-bytes", "2GiB"])
    config = _engine_config(args)
    assert config.cache_dir == "/x" and config.cache_dir_bytes == 2 << 30
