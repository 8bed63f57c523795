"""What a key can read about its own account: `GET /v1/usage` and `GET /v1/user/balance` (DeepSeek's route,
also at `/user/balance` through aliases.py).

The balance answers in DeepSeek's shape: `is_available` (whether the key can still make a request) and one
`balance_infos` entry in USD with exact decimal strings. openr2 has no granted credit, so everything is
`topped_up_balance`. A key without a prepaid balance (or a server without keys) is never refused for money:
`is_available` true and no `balance_infos`. The numbers come from the ledger (balance_store.py).
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request

from openr2.billing import usd_amount
from openr2.server.errors import bad_request
from openr2.server.ledger import USAGE_GROUPS


def balance_payload(balance: dict | None) -> dict:
    """ledger.balance(key_id) -> DeepSeek's /user/balance body."""
    if balance is None:
        return {"is_available": True, "balance_infos": []}
    total = usd_amount(balance["balance_pico_usd"])
    return {"is_available": balance["available_pico_usd"] > 0,
            "balance_infos": [{"currency": "USD", "total_balance": total, "granted_balance": "0.00",
                               "topped_up_balance": total}]}


def add_account_routes(app: FastAPI, server) -> None:
    @app.get("/v1/usage")
    async def usage(request: Request, start: int | None = None, end: int | None = None,
                    group_by: str | None = None):
        key_id = await server.authorise(request)
        if group_by is not None and group_by not in USAGE_GROUPS:
            raise bad_request(f"group_by must be one of {', '.join(USAGE_GROUPS)}.", "group_by")
        for name, value in (("start", start), ("end", end)):
            if value is not None and not -(2**63) <= value < 2**63:  # SQLite integers are 64-bit
                raise bad_request(f"{name} must be a Unix time in seconds.", name)
        rows = await asyncio.to_thread(server.ledger.usage_report, start, end, group_by, key_id=key_id)
        return {"object": "list", "data": rows}

    @app.get("/v1/user/balance")
    async def balance(request: Request):
        return balance_payload(await asyncio.to_thread(server.ledger.balance, await server.authorise(request)))
