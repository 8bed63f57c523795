"""A scripted engine for server tests: the AsyncEngine interface, answering each prompt with the text a test's
script returns for it, token by token through the tokenizer (so text deltas, usage and finish reasons come
out as the real engine's do). For what a random-weight model will never write: tool calls."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from openr2 import billing
from openr2.engine.engine import CompletionOutput, RequestOutput
from openr2.engine.usage import Usage
from openr2.server.app import Server, ServerConfig, create_app
from openr2.server.ledger import Ledger
from openr2.tokenizer import StreamDecoder
from tests.server._live import run_app


class ScriptedEngine:
    def __init__(self, tokenizer, script: Callable[[str], str], max_model_len: int = 4096,
                 model_type: str = "deepseek_v3"):
        self.tokenizer, self.script, self.max_model_len = tokenizer, script, max_model_len
        self.model_type = model_type  # the checkpoint's, as AsyncEngine.model_type tells it
        self.failure, self.num_running, self.num_waiting, self.spec_stats = None, 0, 0, None
        self.prompts: list[str] = []  # every prompt it was given, in order

    async def generate(self, prompt, params, request_id=None, salt=None, priority=0, restartable=False):
        ids = prompt["prompt_token_ids"]
        text = prompt.get("prompt") or self.tokenizer.decode(ids)
        self.prompts.append(text)
        reply = self.tokenizer.encode(self.script(text)) + [self.tokenizer.eos_token_id]
        decoder, out = StreamDecoder(self.tokenizer), CompletionOutput(index=0)
        for k, token in enumerate(reply[:params.max_tokens]):
            eos = token == self.tokenizer.eos_token_id
            delta = "" if eos else decoder.add(token)
            last = eos or k + 1 == params.max_tokens
            if last and not eos:
                delta += decoder.flush()
            out = CompletionOutput(index=0, text=out.text + delta, token_ids=[*out.token_ids, token],
                                   text_delta=delta, token_ids_delta=[token],
                                   finish_reason=("stop" if eos else "length") if last else None)
            yield RequestOutput(request_id, text, ids, [out], last, Usage(len(ids), 0, k + 1))
            if last:
                return

    def shutdown(self) -> None:
        pass


@contextlib.contextmanager
def serve_scripted(tokenizer, script, data: Path, config: ServerConfig | None = None,
                   model_type: str = "deepseek_v3"):
    """Yield (base_url, Server, ScriptedEngine)."""
    engine = ScriptedEngine(tokenizer, script, model_type=model_type)
    ledger = Ledger(data / "ledger.sqlite", data_dir=data)
    server = Server(engine, ledger, billing.PriceTable(), config or ServerConfig(model_name="tiny"))
    try:
        with run_app(create_app(server)) as base_url:
            yield base_url, server, engine
    finally:
        ledger.close()
