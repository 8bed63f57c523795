"""Two `openr2 serve` replicas on one PostgreSQL ledger, as real processes: they share one batch, and when one
is killed with SIGKILL mid-batch the other finishes it, every custom_id once in the output and billed once;
a prepaid key's concurrent requests through both are all debited; a key's rate limit holds across both."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psycopg
import pytest

from openr2.billing import format_usd
from tests.checkpoints import save_tiny_chat_checkpoint
from tests.server._live import free_port, stop
from tests.server.test_app import _batch_file

pytestmark = pytest.mark.slow


def _cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "openr2", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _start(ckpt, url, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "openr2", "serve", "--model", str(ckpt), "--port", str(port),
                             "--database-url", url, "--served-model-name", "tiny", "--no-compile", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


def _wait_healthy(proc: subprocess.Popen, base: str) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise AssertionError(f"replica died: {proc.stderr.read().decode()[-2000:]}")
    raise AssertionError("replica did not start")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        stop(proc)


@pytest.fixture
def replicas(tmp_path, pg_url, request):
    """Two replicas on one database, started with the server flags the test parametrizes (indirect)."""
    ckpt = tmp_path / "ckpt"
    save_tiny_chat_checkpoint(ckpt)
    started = [_start(ckpt, pg_url, *request.param) for _ in range(2)]
    try:
        for proc, base in started:
            _wait_healthy(proc, base)
        yield started
    finally:
        for proc, _ in started:
            _stop(proc)


@pytest.mark.parametrize("replicas", [("--lease-s", "2")], indirect=True)
def test_sigkill_one_replica_mid_batch(replicas, pg_url):
    (proc_a, base_a), (proc_b, base_b) = replicas
    client_a = openai.OpenAI(base_url=f"{base_a}/v1", api_key="x", max_retries=0)
    client_b = openai.OpenAI(base_url=f"{base_b}/v1", api_key="x", max_retries=0)
    upload = client_a.files.create(file=("b.jsonl", _batch_file(24, max_tokens=200)), purpose="batch")
    batch = client_a.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    db = psycopg.connect(pg_url, autocommit=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # both replicas hold lines, and some are finished
        holders = db.execute("SELECT COUNT(DISTINCT claimed_by) FROM batch_requests WHERE state = 'running'").fetchone()[0]
        if holders == 2 and client_b.batches.retrieve(batch.id).request_counts.completed >= 1:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the two replicas never both ran lines of the batch")
    proc_a.send_signal(signal.SIGKILL)
    proc_a.wait()
    assert client_b.batches.retrieve(batch.id).request_counts.completed < 24, "the batch must be cut in the middle"

    deadline = time.time() + 240
    while (b := client_b.batches.retrieve(batch.id)).status != "completed" and time.time() < deadline:
        time.sleep(0.2)
    assert b.status == "completed" and b.request_counts.completed == 24 and b.request_counts.failed == 0
    lines = [json.loads(x) for x in client_b.files.content(b.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(f"req-{i}" for i in range(24))  # each exactly once
    report = httpx.get(f"{base_b}/v1/usage").json()["data"][0]
    assert report["batch_requests"] == report["requests"] == 24  # each line billed once
    rows = db.execute("SELECT COUNT(*), COUNT(DISTINCT custom_id), SUM(completion_tokens) FROM usage"
                      " WHERE batch_id = %s", (batch.id,)).fetchone()
    assert rows[:2] == (24, 24) and rows[2] == b.usage.output_tokens
    db.close()


@pytest.mark.parametrize("replicas", [("--requests-per-min", "6")], indirect=True)
def test_debits_and_rate_limit_hold_across_replicas(replicas, pg_url):
    (_, base_a), (_, base_b) = replicas
    out = _cli("keys", "create", "prepaid", "--balance", "1.00", "--database-url", pg_url).split()
    key_id, secret = out[0], out[1]
    clients = [openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0) for base in (base_a, base_b)]

    def ask(i):
        try:
            r = clients[i % 2].chat.completions.create(model="tiny", max_tokens=8, temperature=0,
                                                       messages=[{"role": "user", "content": f"hi {i}"}])
            return r.usage
        except openai.RateLimitError:
            return None

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(ask, range(10)))
    usages = [u for u in answers if u is not None]
    assert len(usages) == 6  # 6 a minute for the key, whichever replica each request reached
    with psycopg.connect(pg_url) as db:
        spent = db.execute("SELECT SUM(cost_pico_usd), COUNT(*) FROM usage WHERE key_id = %s", (key_id,)).fetchone()
        assert spent[1] == 6 and spent[0] > 0
    keys = [json.loads(x) for x in _cli("keys", "list", "--database-url", pg_url).splitlines()]
    balance_usd = next(k["balance_usd"] for k in keys if k["id"] == key_id)
    assert balance_usd == format_usd(10**12 - int(spent[0]))  # every debit, from either replica, is there
    report = httpx.get(f"{base_a}/v1/usage", headers={"Authorization": f"Bearer {secret}"}).json()["data"][0]
    assert report["requests"] == 6 and report["completion_tokens"] == sum(u.completion_tokens for u in usages)


@pytest.mark.parametrize("replicas", [("--lease-s", "120")], indirect=True)
def test_a_replica_stopped_gracefully_hands_its_lines_over_at_once(replicas, pg_url):
    """SIGTERM (a rolling restart): the stopping replica's claimed lines go back to the queue as it exits, so
    the other finishes the batch long before the 120 s lease would have lapsed."""
    (proc_a, base_a), (_, base_b) = replicas
    client = openai.OpenAI(base_url=f"{base_b}/v1", api_key="x", max_retries=0)
    upload = client.files.create(file=("b.jsonl", _batch_file(24, max_tokens=200)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    with psycopg.connect(pg_url, autocommit=True) as db:
        deadline = time.time() + 120
        while db.execute("SELECT COUNT(DISTINCT claimed_by) FROM batch_requests WHERE state = 'running'"
                         ).fetchone()[0] < 2:
            assert time.time() < deadline, "the two replicas never both ran lines of the batch"
            time.sleep(0.05)
        stopped = time.time()
        _stop(proc_a)
        assert proc_a.returncode is not None
        while (b := client.batches.retrieve(batch.id)).status != "completed":
            assert time.time() - stopped < 90, "the stopped replica's lines waited for its lease"
            time.sleep(0.2)
    assert b.request_counts.completed == 24
    lines = [json.loads(x)["custom_id"] for x in client.files.content(b.output_file_id).text.splitlines()]
    assert sorted(lines) == sorted(f"req-{i}" for i in range(24))
