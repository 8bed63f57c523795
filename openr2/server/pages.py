"""The browser side of the server: the chat page at `GET /` and the price list it reads at `GET /v1/prices`.

The page is one self-contained file (static/index.html, shipped as package data): no build step, no
external URLs, and a Content-Security-Policy that keeps it that way, so a private server stays private.
It talks only to this server's own OpenAI-compatible routes. `/v1/prices` is public (a price list is not a
secret) and gives each price three ways: exact decimal dollars per million tokens, the same as JSON
numbers, and integer micro-dollars per million tokens (= pico-dollars per token), from which the page
computes a request's cost exactly as billing.PriceTable.cost does.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

# Everything the page loads or connects to is its own origin (inline style/script, data: favicon).
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")

# Names the page uses -> PriceTable attribute (integer micro-dollars per million tokens).
_PRICE_FIELDS = {
    "input_miss": "input_miss_micro_usd_per_mtok",
    "input_hit": "input_hit_micro_usd_per_mtok",
    "output": "output_micro_usd_per_mtok",
}


@lru_cache(maxsize=1)
def chat_page_html() -> str:
    """The chat page, read from the installed package (works from a wheel as well as a checkout)."""
    return resources.files("openr2.server").joinpath("static", "index.html").read_text(encoding="utf-8")


def prices_payload(prices, model: str | None = None) -> dict:
    """The price table as `GET /v1/prices` returns it: dollars per million tokens, exact and as numbers."""
    exact = prices.to_dict()  # {"input_miss_usd_per_mtok": "0.14", ..., "batch_discount_percent": 50}
    micro = {key: getattr(prices, name) for key, name in _PRICE_FIELDS.items()}
    return {
        "object": "price_table",
        "model": model,
        "currency": "USD",
        "unit": "per_million_tokens",
        **exact,
        "usd_per_mtok": {key: exact[f"{key}_usd_per_mtok"] for key in _PRICE_FIELDS},
        "usd_per_mtok_number": {key: float(Decimal(exact[f"{key}_usd_per_mtok"])) for key in _PRICE_FIELDS},
        "micro_usd_per_mtok": micro,  # = pico-dollars per token: cost = sum(tokens x price), exact integers
        "batch_discount_percent": prices.batch_discount_percent,
    }


def add_page_routes(app: FastAPI, server) -> None:
    """Register `GET /` (the chat page) and `GET /v1/prices` on an app made by create_app(server)."""

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(chat_page_html(), headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                                       "Cache-Control": "no-cache",
                                                       "X-Content-Type-Options": "nosniff",
                                                       "Referrer-Policy": "no-referrer"})

    @app.get("/v1/prices")
    async def price_list():
        return prices_payload(server.prices, server.config.model_name)
