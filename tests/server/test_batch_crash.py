"""Crash test: SIGKILL `openr2 serve` mid-batch, restart it; every line is answered and billed exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.checkpoints import save_tiny_chat_checkpoint
from tests.server._live import free_port, stop
from tests.server.test_app import _batch_file

pytestmark = pytest.mark.slow


def _serve(ckpt, data, port):
    proc = subprocess.Popen([sys.executable, "-m", "openr2", "serve", "--model", str(ckpt), "--port", str(port),
                             "--data-dir", str(data), "--served-model-name", "tiny", "--no-compile"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise AssertionError(f"server died: {proc.stderr.read().decode()[-2000:]}")
    proc.kill()
    raise AssertionError("server did not start")


def test_sigkill_mid_batch_then_resume(tmp_path):
    ckpt, data = tmp_path / "ckpt", tmp_path / "data"
    save_tiny_chat_checkpoint(ckpt)
    port = free_port()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    proc = _serve(ckpt, data, port)
    try:
        upload = client.files.create(file=("b.jsonl", _batch_file(20, max_tokens=300)), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        deadline = time.time() + 120
        while client.batches.retrieve(batch.id).request_counts.completed < 1 and time.time() < deadline:
            time.sleep(0.05)
        done_before_kill = client.batches.retrieve(batch.id).request_counts.completed
        assert 1 <= done_before_kill < 20, "the batch must be cut in the middle"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = _serve(ckpt, data, port)
    try:
        deadline = time.time() + 180
        while (b := client.batches.retrieve(batch.id)).status != "completed" and time.time() < deadline:
            time.sleep(0.2)
        assert b.status == "completed" and b.request_counts.completed == 20
        lines = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
        assert sorted(x["custom_id"] for x in lines) == sorted(f"req-{i}" for i in range(20))
        report = httpx.get(f"http://127.0.0.1:{port}/v1/usage").json()["data"][0]
        assert report["batch_requests"] == report["requests"] == 20  # each line billed once
    finally:
        stop(proc)
