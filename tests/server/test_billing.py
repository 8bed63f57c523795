"""Billing: exact integer costs with the default price list, batch discount, sums, price-table loading and
validation, and the rate limiter's sliding windows on a fake clock."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from fractions import Fraction

import pytest

from openr2.billing import PICO_USD_PER_USD, PriceTable, format_usd
from openr2.engine.usage import Usage
from openr2.server.ratelimit import RateLimiter

USD = PICO_USD_PER_USD
M = 1_000_000


def test_default_prices_to_the_token():
    p = PriceTable()
    assert p.cost(Usage(prompt_tokens=M)) == USD * 14 // 100  # $0.14 per million cache misses
    assert p.cost(Usage(prompt_tokens=M, cached_prompt_tokens=M)) == USD * 14 // 1000  # $0.014 hits
    assert p.cost(Usage(prompt_tokens=0, completion_tokens=M)) == USD * 28 // 100  # $0.28 output
    assert format_usd(p.cost(Usage(prompt_tokens=M))) == "$0.14"
    assert format_usd(p.cost(Usage(M, M))) == "$0.014"
    # One token of each kind: 0.14e-6 + 0.014e-6 + 0.28e-6 dollars, in pico-dollars.
    assert p.cost(Usage(prompt_tokens=2, cached_prompt_tokens=1, completion_tokens=1)) == 140_000 + 14_000 + 280_000
    # Reasoning tokens are part of completion_tokens: they do not add to the bill.
    assert p.cost(Usage(10, 0, 5, 5)) == p.cost(Usage(10, 0, 5, 0))


def test_batch_is_half_price_exactly():
    p = PriceTable()
    for u in (Usage(1, 0, 0), Usage(1, 1, 0), Usage(0, 0, 1), Usage(12_345, 6_789, 1_001, 17)):
        assert 2 * p.cost(u, batch=True) == p.cost(u)
    assert format_usd(p.cost(Usage(M), batch=True)) == "$0.07"
    assert p.cost(Usage(0), batch=True) == 0


def test_sum_of_many_odd_rows_matches_the_formula():
    rng = random.Random(0)
    p = PriceTable()
    rows = []
    for _ in range(10_000):
        prompt = rng.randint(0, 50_000)
        rows.append((Usage(prompt, rng.randint(0, prompt), rng.randint(0, 9_999)), rng.random() < 0.3))
    total = sum(p.cost(u, batch=b) for u, b in rows)

    def dollars(u, b):  # the price list as exact rationals, dollars per token
        f = Fraction(1, 2) if b else 1
        return f * (Fraction(14, 100) * u.cache_miss_tokens + Fraction(14, 1000) * u.cached_prompt_tokens
                    + Fraction(28, 100) * u.completion_tokens) / M

    assert Fraction(total, USD) == sum(dollars(u, b) for u, b in rows)


def test_usage_validation_and_duck_typing():
    @dataclass
    class EngineUsage:  # the engine's record has the same four fields
        prompt_tokens: int
        cached_prompt_tokens: int
        completion_tokens: int
        reasoning_tokens: int

    assert Usage.of(EngineUsage(10, 4, 3, 1)) == Usage(10, 4, 3, 1)
    assert Usage(10, 4).cache_miss_tokens == 6 and Usage(10, 4, 3).total_tokens == 13
    with pytest.raises(ValueError, match="cached_prompt_tokens"):
        Usage(3, 4)
    with pytest.raises(ValueError, match="reasoning_tokens"):
        Usage(3, 0, 1, 2)
    with pytest.raises(ValueError, match="prompt_tokens"):
        Usage(-1)
    with pytest.raises(ValueError, match="completion_tokens"):
        Usage(1, 0, 1.5)


def test_price_table_from_dict_and_files(tmp_path):
    assert PriceTable.from_dict({}) == PriceTable()
    assert PriceTable.from_dict(PriceTable().to_dict()) == PriceTable()
    assert PriceTable().to_dict() == {"input_miss_usd_per_mtok": "0.14", "input_hit_usd_per_mtok": "0.014",
                                      "output_usd_per_mtok": "0.28", "batch_discount_percent": 50}
    p = PriceTable.from_dict({"output_usd_per_mtok": 0.1, "input_miss_usd_per_mtok": "2",
                              "batch_discount_percent": 25})
    assert (p.output_micro_usd_per_mtok, p.input_miss_micro_usd_per_mtok) == (100_000, 2_000_000)
    assert p.cost(Usage(0, 0, M), batch=True) == 75_000 * M

    toml = tmp_path / "prices.toml"
    toml.write_text('[prices]\noutput_usd_per_mtok = "1.10"\nbatch_discount_percent = 0\n')
    assert PriceTable.load(toml) == PriceTable(output_micro_usd_per_mtok=1_100_000, batch_discount_percent=0)
    js = tmp_path / "prices.json"
    js.write_text(json.dumps({"input_hit_usd_per_mtok": 0.02}))
    assert PriceTable.load(js).input_hit_micro_usd_per_mtok == 20_000
    with pytest.raises(FileNotFoundError):
        PriceTable.load(tmp_path / "missing.toml")
    js.write_text("{not json")
    with pytest.raises(ValueError, match="prices.json"):
        PriceTable.load(js)


@pytest.mark.parametrize("d, field", [
    ({"output_usd_per_mtok": "-1"}, "output_usd_per_mtok"),
    ({"output_usd_per_mtok": "0.0000001"}, "output_usd_per_mtok"),  # finer than a micro-dollar
    ({"output_usd_per_mtok": "cheap"}, "output_usd_per_mtok"),
    ({"output_usd_per_mtok": True}, "output_usd_per_mtok"),
    ({"input_price": "1"}, "input_price"),
    ({"batch_discount_percent": 101}, "batch_discount_percent"),
    ({"batch_discount_percent": 12.5}, "batch_discount_percent"),
    # 0.000001 $/M at 50% off would be half a pico-dollar per token: refused rather than rounded.
    ({"input_hit_usd_per_mtok": "0.000001"}, "input_hit_micro_usd_per_mtok"),
])
def test_price_table_rejects_bad_values(d, field):
    with pytest.raises(ValueError, match=field):
        PriceTable.from_dict(d)


def test_format_usd():
    assert format_usd(0) == "$0.00"
    assert format_usd(USD) == "$1.00"
    assert format_usd(1) == "$0.000000000001"
    assert format_usd(1234 * USD + 5 * USD // 10) == "$1234.50"
    assert format_usd(-USD // 4) == "-$0.25"
    assert format_usd(10**40) == "$" + "1" + "0" * 28 + ".00"  # exact beyond float and Decimal precision
    with pytest.raises(ValueError):
        format_usd(0.5)


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_rate_limiter_requests_window():
    clock = FakeClock()
    rl = RateLimiter(requests_per_min=3, clock=clock)
    for t in (1000, 1010, 1020):
        clock.t = t
        assert rl.acquire("a") == 0
    assert rl.acquire("a") == pytest.approx(40)  # the request at t=1000 leaves the window at 1060
    assert rl.acquire("a") == pytest.approx(40)  # a refused request is not counted
    assert rl.acquire("b") == 0  # keys are independent
    clock.t = 1060
    assert rl.acquire("a") == 0
    assert rl.acquire("a") == pytest.approx(10)  # next to leave: t=1010


def test_rate_limiter_tokens_window():
    clock = FakeClock()
    rl = RateLimiter(tokens_per_min=100, clock=clock)
    assert rl.acquire("a", 60) == 0
    clock.t = 1005
    assert rl.acquire("a", 30) == 0
    assert rl.acquire("a", 20) == pytest.approx(55)  # needs the 60 tokens of t=1000 to leave
    clock.t = 1035
    rl.record_tokens("a", 50)  # output beyond the admitted estimate counts too
    clock.t = 1060  # window now holds 30 (t=1005) + 50 (t=1035)
    assert rl.acquire("a", 30) == pytest.approx(5)
    clock.t = 1065
    assert rl.acquire("a", 30) == 0
    with pytest.raises(ValueError, match="tokens"):
        rl.acquire("a", 101)  # never admissible: the caller rejects instead of asking to retry


def test_rate_limiter_unlimited_and_forgets_idle_keys():
    clock = FakeClock()
    assert RateLimiter().acquire("a", 10**9) == 0
    rl = RateLimiter(requests_per_min=1, tokens_per_min=10, clock=clock)
    for i in range(100):
        assert rl.acquire(f"k{i}", 5) == 0
    clock.t += 61
    assert rl.acquire("z") == 0
    assert set(rl._windows) == {"z"}  # memory does not grow with every key ever seen
    with pytest.raises(ValueError, match="requests_per_min"):
        RateLimiter(requests_per_min=-1)
