"""Live servers for the server tests: uvicorn on 127.0.0.1 in a thread (over the tiny chat checkpoint)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import uvicorn

from openr2 import billing
from openr2.engine.async_engine import AsyncEngine
from openr2.engine.engine import EngineConfig, LLMEngine
from openr2.server.app import Server, ServerConfig, create_app
from openr2.server.ledger import Ledger
from tests.checkpoints import save_tiny_chat_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_app(app):
    """Yield the base URL of `app` served on a free loopback port; stop it afterwards."""
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def serve(ckpt: Path, data: Path, config: ServerConfig | None = None, log_content: bool = False,
          prices: billing.PriceTable | None = None, engine_config: EngineConfig | None = None):
    """Yield (base_url, Server); the ledger is data/ledger.sqlite."""
    config = config or ServerConfig(model_name="tiny", default_max_tokens=16)
    engine_config = engine_config or EngineConfig(block_size=16, num_blocks=256)
    engine = AsyncEngine(LLMEngine.from_pretrained(str(ckpt), engine_config))
    ledger = Ledger(data / "ledger.sqlite", data_dir=data, log_content=log_content)
    server = Server(engine, ledger, prices or billing.PriceTable(), config)
    try:
        with run_app(create_app(server)) as base_url:
            yield base_url, server
    finally:
        engine.shutdown()
        ledger.close()


def db_bytes(data: Path) -> bytes:
    """Every byte of the ledger database: the main file, its WAL and shared memory."""
    return b"".join(p.read_bytes() for p in sorted(data.glob("ledger.sqlite*")) if p.is_file())


@contextlib.contextmanager
def serve_tiny(tmp_path_factory, config: ServerConfig | None = None):
    """serve() over a fresh tiny chat checkpoint: what a module-scoped `live` fixture runs."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tiny_chat_checkpoint(ckpt)
    with serve(ckpt, tmp_path_factory.mktemp("data"), config) as running:
        yield running


def stop(proc: subprocess.Popen) -> None:
    """End a server process as an operator does (SIGTERM: its lifespan finishes), killing it after 20 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
