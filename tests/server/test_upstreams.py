"""Upstream configuration and the pool's choice: least outstanding per weight, prefix affinity with spill-over,
exclusion of the tried and the unhealthy. Pure: no HTTP (tests/server/test_gateway.py runs real upstreams)."""

import pytest

from openr2 import billing
from openr2.server.upstreams import Upstream, UpstreamPool, load_upstreams


def _pool(n=3, **kw) -> UpstreamPool:
    return UpstreamPool([Upstream(f"http://10.0.0.{i}:8000", model="m") for i in range(n)], **kw)


def test_load_upstreams(tmp_path):
    (tmp_path / "cheap.toml").write_text('input_miss_usd_per_mtok = 0.07\n')
    path = tmp_path / "gateway.toml"
    path.write_text('''
max_model_len = 8192
[[upstreams]]
url = "http://a:8000/v1"
models = ["deepseek-ai/DeepSeek-R1", "r1"]
weight = 2
api_key = "sk-up"
prices = {input_miss_usd_per_mtok = 0.5, output_usd_per_mtok = 2}
[[upstreams]]
url = "http://b:8000"
prices = "cheap.toml"
''')
    upstreams, settings = load_upstreams(path)
    assert settings == {"max_model_len": 8192}
    a, b = upstreams
    assert (a.url, a.model, a.weight, a.api_key) == ("http://a:8000", "deepseek-ai/DeepSeek-R1", 2, "sk-up")
    assert a.prices == billing.PriceTable.from_dict({"input_miss_usd_per_mtok": 0.5, "output_usd_per_mtok": 2})
    assert (b.url, b.model, b.weight, b.api_key) == ("http://b:8000", None, 1.0, None)
    assert b.prices.input_miss_micro_usd_per_mtok == 70_000


@pytest.mark.parametrize("text, match", [
    ("", "at least one"),
    ('[[upstreams]]\nmodel = "m"\n', "url is required"),
    ('[[upstreams]]\nurl = "ftp://x"\n', "http"),
    ('[[upstreams]]\nurl = "http://x"\nweight = 0\n', "weight"),
    ('[[upstreams]]\nurl = "http://x"\nwieght = 1\n', "unknown key"),
    ('[[upstreams]]\nurl = "http://x"\nprices = {output_usd_per_mtok = -1}\n', "prices"),
    ("[[upstreams]\n", "cannot parse"),
])
def test_bad_configs_name_the_problem(tmp_path, text, match):
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_upstreams(path)


def test_least_outstanding_per_weight():
    pool = UpstreamPool([Upstream("http://a", model="m", weight=1), Upstream("http://b", model="m", weight=3)],
                        affinity_tokens=0)
    a, b = pool.states
    a.outstanding, b.outstanding = 1, 2  # loads 1 and 2/3
    assert pool.pick([1, 2, 3]) is b
    b.outstanding = 6  # load 2
    assert pool.pick([1, 2, 3]) is a


def test_equal_loads_rotate():
    pool = _pool(3, affinity_tokens=0)
    assert {pool.pick([1]).upstream.url for _ in range(6)} == {s.upstream.url for s in pool.states}


def test_prefix_affinity_is_stable_and_spreads_prefixes():
    pool = _pool(4, affinity_tokens=8)
    shared = list(range(8))
    chosen = pool.pick(shared + [100, 101])
    assert all(pool.pick(shared + tail) is chosen for tail in ([5], [6, 7, 8], list(range(50))))
    # different prefixes land on different upstreams
    owners = {pool.pick([seed] * 8).upstream.url for seed in range(40)}
    assert len(owners) == 4
    # short prompts have no affinity: least loaded
    chosen.outstanding = 1
    assert pool.pick([1, 2]) is not chosen


def test_affinity_spills_over_when_the_preferred_upstream_is_much_busier():
    pool = _pool(2, affinity_tokens=4, affinity_slack=2)
    prompt = [9, 9, 9, 9, 1]
    preferred = pool.pick(prompt)
    preferred.outstanding = 2
    assert pool.pick(prompt) is preferred  # within the slack
    preferred.outstanding = 3
    assert pool.pick(prompt) is not preferred


def test_losing_an_upstream_moves_only_its_prefixes():
    pool = _pool(4, affinity_tokens=8)
    prompts = [[seed] * 8 for seed in range(60)]
    before = [pool.pick(p) for p in prompts]
    gone = pool.states[0]
    pool.mark_failed(gone, "test")
    after = [pool.pick(p) for p in prompts]
    assert all(b is a for a, b in zip(before, after) if a is not gone)
    assert gone not in after


def test_unhealthy_tried_and_unnamed_upstreams_are_skipped():
    pool = _pool(3, affinity_tokens=0)
    a, b, c = pool.states
    pool.mark_failed(a, "down")
    c.model = None  # its model is not known yet (not probed)
    assert pool.pick([1]) is b
    assert pool.pick([1], exclude={b}) is None


@pytest.mark.parametrize("kw", [{"affinity_tokens": -1}, {"affinity_slack": 0}, {"probe_interval_s": "1"}])
def test_bad_pool_options(kw):
    with pytest.raises(ValueError):
        _pool(1, **kw)


def test_serve_with_upstreams_builds_a_gateway(tmp_path, monkeypatch, capsys):
    """`openr2 serve --config gateway.toml --upstream URL`: the config's upstreams, then the flags', behind the
    usual server over the checkpoint's tokenizer; a bad file is a message and exit 2, not a traceback."""
    import uvicorn

    from openr2.cli import main
    from openr2.server.gateway import UpstreamBackend
    from tests.tokenizer_utils import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "ckpt")
    (tmp_path / "gateway.toml").write_text('max_model_len = 1024\nprobe_interval_s = 5\n'
                                           '[[upstreams]]\nurl = "http://a:8000"\nmodel = "r1"\nweight = 3\n'
                                           'served_model_name = "reasoner"\n')
    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: apps.append(self.config.app))  # instead of listening
    argv = ["serve", "--model", str(tmp_path / "ckpt"), "--data-dir", str(tmp_path / "data")]
    assert main([*argv, "--config", str(tmp_path / "gateway.toml"), "--upstream", "http://b:8001/v1"]) == 3
    backend = apps[0].state.server.engine
    assert isinstance(backend, UpstreamBackend) and backend.max_model_len == 1024
    assert [(s.upstream.url, s.model, s.upstream.weight) for s in backend.pool.states] == [
        ("http://a:8000", "r1", 3), ("http://b:8001", None, 1.0)]
    assert apps[0].state.server.model_names[:2] == ["ckpt", "reasoner"]  # its own model and the upstream's
    assert backend.pool.probe_interval_s == 5
    (tmp_path / "bad.toml").write_text('[[upstreams]]\nurl = "http://a"\nwieght = 2\n')
    assert main([*argv, "--config", str(tmp_path / "bad.toml")]) == 2
    assert "unknown key" in capsys.readouterr().err
    # an upstream dearer than the server's own table could overdraw a prepaid balance: refused
    (tmp_path / "dear.toml").write_text('[[upstreams]]\nurl = "http://a"\nprices = {output_usd_per_mtok = 100}\n')
    assert main([*argv, "--config", str(tmp_path / "dear.toml")]) == 2
    assert "above the server's" in capsys.readouterr().err
    (tmp_path / "prices.toml").write_text("output_usd_per_mtok = 100\n")
    assert main([*argv, "--config", str(tmp_path / "dear.toml"), "--prices", str(tmp_path / "prices.toml")]) == 3


def test_a_probe_survives_any_answer():
    """An upstream whose /v1/models is not what OpenAI's is (a list, not an object) is out, not a crash."""
    import asyncio

    import httpx

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=[1, 2]) if request.url.path == "/v1/models" else httpx.Response(200)

    pool = UpstreamPool([Upstream("http://odd:1")])

    async def probe():
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await pool.probe(client, pool.states[0])

    assert asyncio.run(probe()) is False
    assert not pool.states[0].healthy and "AttributeError" in pool.states[0].last_error
