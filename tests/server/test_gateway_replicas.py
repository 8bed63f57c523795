"""The deployment of issue 21 as real processes: two gateway replicas (`openr2 serve --upstream URL
--database-url postgresql://...`) in front of an openr2 upstream, sharing one PostgreSQL ledger. One gateway
is killed with SIGKILL mid-batch: the other finishes the batch, every custom_id once in the output, each billed
once, with the usage the upstream reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import psycopg
import pytest

from tests.checkpoints import save_tiny_chat_checkpoint
from tests.server._live import free_port
from tests.server._upstreams import ROOT, start_upstream, stop, wait_ready
from tests.server.test_app import _batch_file

pytestmark = pytest.mark.slow
LINES = 24


def _start_gateway(ckpt, upstream: str, pg_url: str, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "openr2", "serve", "--model", str(ckpt), "--upstream", upstream,
                             "--database-url", pg_url, "--served-model-name", "tiny", "--lease-s", "2",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture
def deployment(tmp_path, pg_url):
    """(upstream, [(gateway process, base URL)] * 2): both gateways healthy over one openr2 upstream."""
    ckpt = tmp_path / "ckpt"
    save_tiny_chat_checkpoint(ckpt)
    upstream = start_upstream(ckpt, tmp_path / "up")
    started = []
    try:
        with open(tmp_path / "gateways.log", "wb") as log:
            started = [_start_gateway(ckpt, upstream[1], pg_url, log) for _ in range(2)]
        wait_ready(*upstream)
        for proc, base in started:
            wait_ready(proc, base, timeout_s=120)
        yield upstream, started
    finally:
        for proc, _ in started:
            stop(proc)
        stop(upstream[0])


def test_sigkill_one_gateway_replica_mid_batch(deployment, pg_url):
    _, ((proc_a, base_a), (_, base_b)) = deployment
    client_a = openai.OpenAI(base_url=f"{base_a}/v1", api_key="x", max_retries=0)
    client_b = openai.OpenAI(base_url=f"{base_b}/v1", api_key="x", max_retries=0)
    upload = client_a.files.create(file=("b.jsonl", _batch_file(LINES, max_tokens=200)), purpose="batch")
    batch = client_a.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    with psycopg.connect(pg_url, autocommit=True) as db:
        deadline = time.time() + 120
        while db.execute("SELECT COUNT(DISTINCT claimed_by) FROM batch_requests WHERE state = 'running'"
                         ).fetchone()[0] < 2:  # both gateways have lines at the upstream
            assert time.time() < deadline, "the two gateways never both ran lines of the batch"
            time.sleep(0.05)
        proc_a.send_signal(signal.SIGKILL)
        proc_a.wait()
        assert client_b.batches.retrieve(batch.id).request_counts.completed < LINES, "the batch must be cut midway"

        deadline = time.time() + 240
        while (b := client_b.batches.retrieve(batch.id)).status != "completed":
            assert time.time() < deadline, f"the batch did not complete: {b}"
            time.sleep(0.2)
        assert b.request_counts.completed == LINES and b.request_counts.failed == 0
        lines = [json.loads(x) for x in client_b.files.content(b.output_file_id).text.splitlines()]
        assert sorted(x["custom_id"] for x in lines) == sorted(f"req-{i}" for i in range(LINES))  # each once
        rows = db.execute("SELECT COUNT(*), COUNT(DISTINCT custom_id), SUM(completion_tokens) FROM usage"
                          " WHERE batch_id = %s", (batch.id,)).fetchone()
        assert rows[:2] == (LINES, LINES) and rows[2] == b.usage.output_tokens  # each line billed once
        # the bills are what the output file tells the client, line by line
        told = {x["custom_id"]: x["response"]["body"]["usage"]["completion_tokens"] for x in lines}
        billed = dict(db.execute("SELECT custom_id, completion_tokens FROM usage WHERE batch_id = %s",
                                 (batch.id,)).fetchall())
        assert billed == told
        sources = db.execute("SELECT usage_source, COUNT(*) FROM usage WHERE batch_id = %s GROUP BY usage_source",
                             (batch.id,)).fetchall()
        assert sources == [("upstream", LINES)]  # each bill on the counts the upstream reported
    report = httpx.get(f"{base_b}/v1/usage").json()["data"][0]
    assert report["batch_requests"] == report["requests"] == LINES
