"""Prices and the cost of one usage record, in exact integers.

Owns the price table (defaults from our price list, loadable from JSON/TOML), the cost rule and money
formatting, for the server (which bills every request) and eval (which reports what a run would cost). It
reads the engine's `Usage` (engine/usage.py), stores nothing (server/ledger.py does) and knows nothing
about HTTP.

Units. Prices are integer micro-dollars per million tokens ("mtok"): $0.14 per million tokens is
140_000. A micro-dollar per million tokens is exactly one pico-dollar per token, so the cost of a request
is an integer number of pico-dollars (1e-12 USD): tokens x price, no division, no rounding. Costs stored
in the ledger and every sum over them are therefore exact. The batch discount is applied to the per-token
price, and the table refuses a discount that would make a discounted price fractional, so batch costs are
exact too. Int64 (SQLite's INTEGER) holds about $9.2 million in pico-dollars, far beyond one ledger.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from decimal import Decimal, InvalidOperation

from openr2.engine.usage import Usage

PICO_USD_PER_USD = 10**12
MICRO_USD_PER_USD = 10**6


# File/dict keys are in dollars per million tokens, as a price list reads; the dataclass holds micro-dollars.
_FILE_KEYS = {
    "input_miss_usd_per_mtok": "input_miss_micro_usd_per_mtok",
    "input_hit_usd_per_mtok": "input_hit_micro_usd_per_mtok",
    "output_usd_per_mtok": "output_micro_usd_per_mtok",
}


@dataclass(frozen=True)
class PriceTable:
    """Integer micro-dollars per million tokens (= pico-dollars per token), and the batch discount."""

    input_miss_micro_usd_per_mtok: int = 140_000  # $0.14 / M prompt tokens not in the prefix cache
    input_hit_micro_usd_per_mtok: int = 14_000  # $0.014 / M prompt tokens served by the prefix cache
    output_micro_usd_per_mtok: int = 280_000  # $0.28 / M completion tokens, reasoning included
    batch_discount_percent: int = 50  # Batch API lines cost this much less

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"prices.{f.name} must be a non-negative integer, got {value!r}")
        if self.batch_discount_percent > 100:
            raise ValueError(f"prices.batch_discount_percent must be 0..100, got {self.batch_discount_percent}")
        keep = 100 - self.batch_discount_percent
        for name in _FILE_KEYS.values():
            if getattr(self, name) * keep % 100:
                # A fractional pico-dollar per token would force rounding somewhere; refuse it up front.
                raise ValueError(f"prices.{name}={getattr(self, name)} with a {self.batch_discount_percent}% "
                                 f"batch discount is not a whole micro-dollar per million tokens")

    def per_token_pico_usd(self, batch: bool) -> tuple[int, int, int]:
        """(cache miss, cache hit, output) prices in pico-dollars per token, discounted for batch lines."""
        prices = (self.input_miss_micro_usd_per_mtok, self.input_hit_micro_usd_per_mtok,
                  self.output_micro_usd_per_mtok)
        if not batch:
            return prices
        keep = 100 - self.batch_discount_percent
        return tuple(p * keep // 100 for p in prices)  # exact: __post_init__ checked divisibility

    def cost(self, usage, batch: bool = False) -> int:
        """Exact cost of one request in pico-dollars (integer)."""
        usage = Usage.of(usage)
        miss, hit, out = self.per_token_pico_usd(batch)
        return usage.cache_miss_tokens * miss + usage.cached_prompt_tokens * hit + usage.completion_tokens * out

    def worst_case(self, prompt_tokens: int, max_completion_tokens: int, batch: bool = False) -> int:
        """The most a request can cost, in pico-dollars: its whole prompt at the cache-miss price and every
        token it may generate (max_tokens x n) at the output price. What a prepaid balance reserves."""
        miss, hit, out = self.per_token_pico_usd(batch)
        return prompt_tokens * max(miss, hit) + max_completion_tokens * out

    def to_dict(self) -> dict:
        """The file form: dollars per million tokens as exact decimal strings."""
        d = {key: _usd_str(getattr(self, name)) for key, name in _FILE_KEYS.items()}
        d["batch_discount_percent"] = self.batch_discount_percent
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "prices") -> PriceTable:
        """From the file form; missing keys keep their defaults, unknown keys are errors.

        Dollar amounts may be strings ("0.14", exact), ints, or floats (read through their shortest repr,
        so 0.14 means 0.14); they must be whole micro-dollars per million tokens.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a table of prices, got {type(d).__name__}")
        kwargs = {}
        for key, value in d.items():
            if key == "batch_discount_percent":
                kwargs[key] = value
            elif key in _FILE_KEYS:
                kwargs[_FILE_KEYS[key]] = _parse_usd_per_mtok(value, f"{source}: {key}")
            else:
                allowed = ", ".join([*_FILE_KEYS, "batch_discount_percent"])
                raise ValueError(f"{source}: unknown price key {key!r} (allowed: {allowed})")
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> PriceTable:
        """From a .json or .toml file: the keys at top level or under a `prices` table."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"price table not found: {path}")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            if path.endswith(".toml"):
                import tomllib

                data = tomllib.loads(raw.decode("utf-8"))
            else:
                data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
            raise ValueError(f"{path}: cannot parse price table: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("prices"), dict):
            data = data["prices"]
        return cls.from_dict(data, source=path)


def _parse_usd_per_mtok(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where} must be a number of dollars, got {value!r}")
    try:
        usd = Decimal(repr(value) if isinstance(value, float) else str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{where} is not a number: {value!r}") from None
    micro = usd * MICRO_USD_PER_USD
    if not usd.is_finite() or usd < 0 or micro != micro.to_integral_value():
        raise ValueError(f"{where} must be a non-negative amount in whole micro-dollars, got {value!r}")
    return int(micro)


def _usd_str(micro_usd: int) -> str:
    return _fixed(micro_usd, 6)


def _fixed(n: int, places: int) -> str:
    """n / 10**places as an exact decimal string, trailing zeros dropped but at least two places."""
    whole, frac = divmod(abs(n), 10**places)
    frac_str = str(frac).rjust(places, "0").rstrip("0").ljust(2, "0")
    return f"{'-' if n < 0 else ''}{whole}.{frac_str}"


def parse_usd(value, where: str = "amount") -> int:
    """A dollar amount ("5.00", 5, 0.5) -> exact integer pico-dollars; ValueError if it is not a
    non-negative amount in whole pico-dollars."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where} must be a number of dollars, got {value!r}")
    try:
        usd = Decimal(repr(value) if isinstance(value, float) else str(value).strip().removeprefix("$"))
    except InvalidOperation:
        raise ValueError(f"{where} is not a number: {value!r}") from None
    pico = usd * PICO_USD_PER_USD
    if not usd.is_finite() or usd < 0 or pico != pico.to_integral_value():
        raise ValueError(f"{where} must be a non-negative amount of dollars (at most 12 decimals), got {value!r}")
    return int(pico)


def usd_amount(pico_usd: int) -> str:
    """Pico-dollars -> an exact decimal string without the sign: 5_000_000_000_000 -> "5.00" (DeepSeek's
    balance fields are such strings)."""
    return format_usd(pico_usd).replace("$", "")


def format_usd(pico_usd: int) -> str:
    """Pico-dollars -> an exact dollar string: 140_000_000_000 -> "$0.14", 140_000 -> "$0.00000014"."""
    if isinstance(pico_usd, bool) or not isinstance(pico_usd, int):
        raise ValueError(f"pico_usd must be an integer, got {pico_usd!r}")
    s = _fixed(pico_usd, 12)
    return f"-${s[1:]}" if s.startswith("-") else f"${s}"
