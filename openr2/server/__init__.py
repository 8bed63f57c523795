"""The OpenAI-compatible server: HTTP routes, billing, the SQLite ledger, API keys and rate limits."""
