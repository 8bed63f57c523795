"""The disk tier through the server: a prompt asked again after a restart (a new engine and server on the same
--cache-dir and ledger) is answered from blocks loaded from disk, its usage counts them as cache hits and the
ledger bills them at the cache-hit price."""

from __future__ import annotations

import httpx
import openai

from openr2 import billing
from openr2.engine.engine import EngineConfig
from openr2.engine.usage import Usage
from openr2.server.app import ServerConfig
from tests.checkpoints import save_tiny_chat_checkpoint
from tests.server._live import serve


def _serve(ckpt, data, cache_dir):
    return serve(ckpt, data, ServerConfig(model_name="tiny", default_max_tokens=8),
                 engine_config=EngineConfig(block_size=16, num_blocks=64, cache_dir=str(cache_dir)))


def _cost(base_url) -> int:
    rows = httpx.get(base_url + "/v1/usage").json()["data"]
    return rows[0]["cost_pico_usd"] if rows else 0


def test_a_restarted_server_bills_the_disk_blocks_as_cache_hits(tmp_path):
    ckpt, data, cache = tmp_path / "ckpt", tmp_path / "data", tmp_path / "cache"
    save_tiny_chat_checkpoint(ckpt)
    data.mkdir()
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Count the apples: one two three. " * 12}],
                  max_tokens=4, temperature=0)
    with _serve(ckpt, data, cache) as (base_url, _):
        first = openai.OpenAI(base_url=base_url + "/v1", api_key="x").chat.completions.create(**kwargs)
    assert first.usage.prompt_cache_hit_tokens == 0 and first.usage.prompt_tokens > 64
    assert any(cache.rglob("*.blk"))
    with _serve(ckpt, data, cache) as (base_url, server):
        before = _cost(base_url)
        again = openai.OpenAI(base_url=base_url + "/v1", api_key="x").chat.completions.create(**kwargs)
        after = _cost(base_url)
        assert server.engine.engine.blocks.disk.cache.stats.hits > 0
    u = again.usage
    assert u.prompt_cache_hit_tokens == (first.usage.prompt_tokens - 1) // 16 * 16  # every full prompt block
    assert u.prompt_tokens_details.cached_tokens == u.prompt_cache_hit_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
    cost = billing.PriceTable().cost(Usage(u.prompt_tokens, u.prompt_cache_hit_tokens, u.completion_tokens))
    assert after - before == cost == (u.prompt_cache_miss_tokens * 140_000 + u.prompt_cache_hit_tokens * 14_000
                                      + u.completion_tokens * 280_000)
