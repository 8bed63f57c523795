"""The gateway in front of llama.cpp's server (llama-cpp-python's `[server]` extra) serving a GGUF that openr2's
exporter wrote: the official client gets the answer llama.cpp gives for the same prompt, with its counts, and
the ledger holds them. That server takes text prompts only (not ids), so its upstream is configured
`token_ids = false`. Skipped where llama-cpp-python's server is not installed (it builds llama.cpp from
source: `make bench-deps`, then `pip install 'llama-cpp-python[server]'`)."""

import contextlib
import importlib.util
import sqlite3
import subprocess
import sys
import time

import httpx
import openai
import pytest

from openr2.chat_format import render_chat
from openr2.export.gguf import export_gguf
from openr2.server.upstreams import Upstream
from openr2.tokenizer import Tokenizer
from tests.export.test_gguf import save_checkpoint
from tests.server._live import free_port
from tests.server._upstreams import gateway, stop

SERVER_MODULES = ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in SERVER_MODULES),
    reason="needs llama-cpp-python's server: pip install 'llama-cpp-python[server]' (compiles llama.cpp; "
           "not installed here)")]
USER = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf")
    save_checkpoint(path)
    export_gguf(path, path / "m-f32.gguf", "f32")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(path / "m-f32.gguf"),
                             "--port", str(port), "--n_ctx", "512", "--model_alias", "m",
                             # else each new request, the gateway's health probes included, cancels the one
                             # being generated (its default): a gateway's upstream must not
                             "--interrupt_requests", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "llama_cpp.server exited"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                break
        time.sleep(0.2)
    try:
        yield path, url
    finally:
        stop(proc)


def test_same_answer_and_usage_as_llama_cpp(llama_server, tmp_path):
    ckpt, url = llama_server
    tok = Tokenizer.from_pretrained(ckpt)
    ids = tok.encode(render_chat(USER, tok))
    assert ids[0] == tok.bos_token_id  # which llama.cpp adds itself: the text goes without it
    direct = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": tok.decode(ids[1:]), "max_tokens": 8,
                                                       "temperature": 0}, timeout=60).json()
    assert direct["usage"]["prompt_tokens"] == len(ids)  # the same prompt ids, BOS included
    with gateway(ckpt, tmp_path, [Upstream(url, token_ids=False)]) as (base_url, _):
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
        resp = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
        assert resp.choices[0].text == direct["choices"][0]["text"]
        assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (
            direct["usage"]["prompt_tokens"], direct["usage"]["completion_tokens"])
        chat = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0)
        # the chat prompt is the same ids (the gateway renders it), so the same greedy answer and counts
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (resp.usage.prompt_tokens,
                                                                           resp.usage.completion_tokens)
        db = sqlite3.connect(tmp_path / "ledger.sqlite")
        row = db.execute("SELECT prompt_tokens, completion_tokens FROM usage WHERE request_id = ?",
                         (chat.id,)).fetchone()
        db.close()
        assert row == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
