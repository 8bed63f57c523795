"""Real upstream servers for the gateway tests: `openr2 serve` processes over the tiny chat checkpoint (killable
with SIGKILL), and the gateway itself in this process over them (so the tests can read its ledger and pool)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from openr2 import billing
from openr2.server.app import Server, ServerConfig, create_app
from openr2.server.gateway import UpstreamBackend
from openr2.server.ledger import Ledger
from openr2.server.upstreams import Upstream, UpstreamPool
from openr2.tokenizer import Tokenizer
from tests.server._live import free_port, run_app

ROOT = Path(__file__).resolve().parents[2]


def start_upstream(ckpt: Path, data: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """Start `openr2 serve` on a free port (not yet ready: see wait_ready)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "openr2", "serve", "--model", str(ckpt), "--served-model-name", "tiny",
           "--no-compile", "--block-size", "16", "--num-blocks", "256", "--port", str(port),
           "--data-dir", str(data), *flags]
    log = open(data.parent / f"{data.name}.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 240) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"upstream {url} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"upstream {url} did not start in {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def gateway(ckpt: Path, data: Path, urls: list, config: ServerConfig | None = None, **pool_options):
    """Yield (base_url, Server) of a gateway over `urls` (base URLs or Upstreams; its ledger is
    data/ledger.sqlite)."""
    upstreams = [u if isinstance(u, Upstream) else Upstream(u) for u in urls]
    pool = UpstreamPool(upstreams, **{"probe_interval_s": 0.5, **pool_options})
    backend = UpstreamBackend(pool, Tokenizer.from_pretrained(ckpt))
    ledger = Ledger(data / "ledger.sqlite", data_dir=data)
    server = Server(backend, ledger, billing.PriceTable(), config or ServerConfig(model_name="tiny"))
    try:
        with run_app(create_app(server)) as base_url:
            yield base_url, server
    finally:
        ledger.close()
