"""The browser side of the server: the chat page at `GET /` and the price list it reads at `GET /v1/prices`.

The page is one self-contained file (static/index.html, shipped as package data): no build step, no
external URLs, and a Content-Security-Policy that keeps it that way, so a private server stays private.
It talks only to this server's own OpenAI-compatible routes. `/v1/prices` is public (a price list is not a
secret) and gives each price three ways: exact decimal dollars per million tokens, the same as JSON
numbers, and integer micro-dollars per million tokens (= pico-dollars per token), from which the page
computes a request's cost exactly as billing.PriceTable.cost does.

The empty page offers example prompts the served model can answer. They come from its model card: the
bullet lines of an `## Example prompts` section in the checkpoint's README.md (`example_prompts`, read once
by `openr2 serve` into ServerConfig.example_prompts), and are written into the page as a JSON data block.
"""

from __future__ import annotations

import json
import os
import re
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


# The page's data block for the example prompts; render_chat_page fills in the list.
_EXAMPLES_BLOCK = '<script id="example-prompts" type="application/json">[]</script>'
_HEADING = re.compile(r"(#{1,6})\s+(.*?)(?:\s+#+)?\s*")  # a markdown heading line: level, title
_BULLET = re.compile(r"[-*+]\s+(.*?)\s*")
_FENCE = re.compile(r"\s*(```|~~~)")


@lru_cache(maxsize=1)
def chat_page_html() -> str:
    """The chat page, read from the installed package (works from a wheel as well as a checkout)."""
    return resources.files("openr2.server").joinpath("static", "index.html").read_text(encoding="utf-8")


def render_chat_page(examples: list[str]) -> str:
    """The chat page with its example prompts in the data block."""
    # `<` escaped so that no text can close the <script> element early; JSON.parse reads \u003c back as `<`
    data = json.dumps(list(examples), ensure_ascii=False).replace("<", "\\u003c")
    return chat_page_html().replace(_EXAMPLES_BLOCK, _EXAMPLES_BLOCK.replace("[]", data))


def example_prompts(model_dir: str | os.PathLike) -> list[str]:
    """The bullets of the `## Example prompts` section of the model card (model_dir/README.md), in order.

    `- What is 2+2?` and `` - `What is 2+2?` `` both give "What is 2+2?" (backticks keep markdown from
    reformatting a prompt). No README, an unreadable one or no such section: no examples, never an error,
    since the card is documentation and the server runs without it.
    """
    try:
        with open(os.path.join(model_dir, "README.md"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    out: list[str] = []
    level = 0  # of the open `Example prompts` heading; 0 outside it
    fenced = False  # inside a code block, where `#` and `-` lines are code, not markdown
    for line in lines:
        if _FENCE.match(line):
            fenced = not fenced
            continue
        heading = None if fenced else _HEADING.fullmatch(line)
        if heading:
            depth = len(heading.group(1))
            if heading.group(2).lower() == "example prompts":
                level = depth
            elif depth <= level:  # a subheading stays inside the section, a sibling or parent ends it
                level = 0
            continue
        bullet = _BULLET.fullmatch(line) if level and not fenced else None
        if bullet and (text := _unwrap_code(bullet.group(1))):
            out.append(text)
    return out


def _unwrap_code(text: str) -> str:
    """`` `What is 2+2?` `` -> "What is 2+2?": the text, less a code span that wraps all of it."""
    ticks = re.match(r"`+", text)
    if ticks:
        inner = text[ticks.end():len(text) - ticks.end()]
        # the span wraps everything only if it closes at the very end (markdown closes it at the first run
        # of as many backticks)
        if text.endswith(ticks.group()) and len(text) > 2 * ticks.end() and \
                not re.search(rf"(?<!`){ticks.group()}(?!`)", inner):
            return inner.strip()
    return text


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
        return HTMLResponse(render_chat_page(server.config.example_prompts),
                            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache",
                                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    @app.get("/v1/prices")
    async def price_list():
        return prices_payload(server.prices, server.config.model_name)
