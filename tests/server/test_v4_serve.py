"""`openr2 serve --model V4_CHECKPOINT`: a tiny DeepSeek-V4 served through the same API (a subprocess, as a user
starts it, compile left at its default: V4 decodes eagerly). A completion comes back with usage, its text the
offline `LLM`'s greedy text; the same prompt again is a prefix-cache hit, billed as one."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import httpx

from openr2.checkpoints import save_model
from openr2.model.transformer import build_model
from openr2.presets import tiny_v4
from tests.hf_utils import perturb_
from tests.server._live import free_port, stop
from tests.tokenizer_utils import tiny_tokenizer

PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the deep green forest " * 2


def _save_tiny_v4(path) -> None:
    tok = tiny_tokenizer()
    config = dataclasses.replace(tiny_v4(), vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                                 bos_token_id=tok.bos_token_id)
    model = build_model(config, seed=3)
    perturb_(model, seed=3, scale=0.3)  # clear-cut greedy choices
    save_model(model, path)
    tok.save_pretrained(path)


def test_serve_v4_completion_with_usage(tmp_path):
    from openr2.engine.llm import LLM
    from openr2.engine.sampling import SamplingParams

    ckpt = tmp_path / "ckpt"
    _save_tiny_v4(ckpt)
    offline = LLM(str(ckpt), compile=False, block_size=16).generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert len(offline.prompt_token_ids) > 32  # long enough for prefix-cache blocks of 16
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "openr2", "serve", "--model", str(ckpt), "--port", str(port),
                             "--data-dir", str(tmp_path / "data"), "--served-model-name", "tiny-v4",
                             "--block-size", "16"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
            assert proc.poll() is None, f"server died: {proc.stderr.read().decode()[-2000:]}"
            assert time.time() < deadline, "server did not start"
        body = {"model": "tiny-v4", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        first = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
        again = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
    finally:
        stop(proc)
    P = len(offline.prompt_token_ids)
    for resp in (first, again):
        assert resp["choices"][0]["text"] == offline.outputs[0].text
        u = resp["usage"]
        assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (P, 12, P + 12)
        assert u["prompt_cache_hit_tokens"] + u["prompt_cache_miss_tokens"] == P
    assert first["usage"]["prompt_cache_hit_tokens"] == 0
    assert again["usage"]["prompt_cache_hit_tokens"] == P // 16 * 16 - (16 if P % 16 == 0 else 0)
