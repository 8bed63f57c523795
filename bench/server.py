"""Server: can the HTTP server keep up with the engine it fronts?

One ~12M-parameter MoE+MLA model (`openr2.presets.small_moe()` with the tokenizer's vocab), float32, CPU,
random perturbed weights, saved with `save_model` next to a byte-level BPE tokenizer (`train_bpe`, vocab
4096, trained in seconds on generated lines).
  server:  `python -m openr2 serve` as a subprocess on a free 127.0.0.1 port (temp data dir), driven by
           N concurrent streaming chat clients (asyncio + httpx, loopback only), each with its own prompt,
           `max_tokens`, `ignore_eos`, temperature 0, `stream_options.include_usage`. Per request: time to
           first token (first chunk carrying reasoning_content or content), inter-token latencies (between
           such chunks), errors (non-200, stream error, missing usage). Aggregate tokens/s = completion
           tokens (from usage) / wall time of the whole round.
  offline: the same prompts, tokenised as the server does (`encode_chat`), all added at once to an
           in-process `LLMEngine` (same default `EngineConfig`, same tokenizer, so detokenising is paid on
           both sides), same max_tokens / ignore_eos / greedy; aggregate tokens/s.
Each round uses fresh prompts (no prefix-cache hits between rounds), the same on both sides; server and
offline rounds alternate (one warm-up round each first), so other load on the machine falls on both; the
median of --runs rounds per side is reported; the headline ratio is the median of the per-round
(paired) ratios, which outside load drifting between rounds disturbs less than the ratio of medians.
Both sides run with the same torch thread count (the server subprocess gets OMP_NUM_THREADS; this process
calls torch.set_num_threads). The client runs in this process during the server rounds, so it shares the
CPUs with the server, as a local client would.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/server.py [--clients 32 --max-tokens 64 --threads 2]
Prints a header, a table, the ratio server / offline against its target (>= 0.9, issue 16), and a final JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)  # run from a checkout

import httpx  # noqa: E402

from openr2.chat_format import encode_chat  # noqa: E402
from openr2.checkpoints import save_model  # noqa: E402
from openr2.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from openr2.engine.sampling import SamplingParams  # noqa: E402
from openr2.model.accounting import model_stats  # noqa: E402
from openr2.model.transformer import build_model  # noqa: E402
from openr2.presets import small_moe  # noqa: E402
from openr2.tokenizer import train_bpe  # noqa: E402

MODEL_NAME = "bench"
_WORDS = ("the a one two three four five six seven eight nine ten plus minus times equals answer question "
          "think reason step first then so because number sum total prime even odd square root value model "
          "server token cache request stream latency engine batch expert layer attention").split()


def _lines(n: int, seed: int) -> list[str]:
    """Generated text: common words, numbers and made-up syllable words (enough variety for 4096 merges)."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "er", "ing", "ion", "qu"]

    def word() -> str:
        r = rng.random()
        if r < 0.5:
            return rng.choice(_WORDS)
        if r < 0.6:
            return str(rng.randint(0, 99999))
        return "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))

    return [" ".join(word() for _ in range(rng.randint(6, 24))).capitalize() + rng.choice([".", "?", "!", ":"])
            for _ in range(n)]


def make_checkpoint(path: str, seed: int = 0):
    """A perturbed small_moe + a BPE tokenizer trained on generated text, saved as one checkpoint dir."""
    tokenizer = train_bpe(_lines(4000, seed), vocab_size=4096)
    config = dataclasses.replace(small_moe(), vocab_size=tokenizer.vocab_size, num_nextn_predict_layers=0,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = build_model(config, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a fresh init is nearly uniform: nudge everything, as bench/engine.py does
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    save_model(model, path)
    tokenizer.save_pretrained(path)
    return tokenizer


def prompts_for(round_name: str, n: int) -> list[str]:
    """n distinct user messages; the round name makes every round's prompts new to the prefix cache."""
    lines = _lines(n, seed=zlib.crc32(round_name.encode()))
    return [f"Round {round_name}, question {i}: {line} Explain step by step." for i, line in enumerate(lines)]


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


# ---------------------------------------------------------------------------------------------- server side
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: str, data_dir: str, port: int, threads: int, log_path: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "openr2", "serve", "--model", ckpt, "--port", str(port), "--data-dir", data_dir,
           "--served-model-name", MODEL_NAME]
    log = open(log_path, "wb")
    return wait_healthy(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), port, log_path)


def wait_healthy(proc: subprocess.Popen, port: int, log_path: str, timeout_s: float = 900) -> subprocess.Popen:
    """proc once its /health answers 200; SystemExit with its log if it exits or is not healthy in time (a first
    start compiles its decode steps: minutes on 2 vCPUs, then cached)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"FAIL: {proc.args} exited with {proc.returncode}:\n{open(log_path).read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise SystemExit(f"FAIL: {proc.args} not healthy after {timeout_s:.0f} s:\n{open(log_path).read()}")


def stop_server(proc: subprocess.Popen) -> str:
    """SIGTERM (uvicorn shuts down gracefully, then re-raises the signal: exit -15), SIGKILL after 15 s."""
    if proc.poll() is not None:
        return f"had already exited ({proc.returncode})"
    proc.send_signal(signal.SIGTERM)
    t0 = time.perf_counter()
    try:
        proc.wait(timeout=15)
        return f"stopped by SIGTERM in {time.perf_counter() - t0:.1f} s (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "SIGTERM ignored for 15 s: killed"


async def one_stream(client: httpx.AsyncClient, prompt: str, max_tokens: int, t_start: float) -> dict:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    times, usage, error = [], None, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            else:
                done = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    now = time.perf_counter()
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = f"stream error: {chunk['error']}"
                        break
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        if delta.get("reasoning_content") or delta.get("content"):
                            times.append(now)
                            break
                if error is None and not done:
                    error = "stream ended without [DONE]"
                elif error is None and usage is None:
                    error = "no usage chunk"
    except (httpx.HTTPError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    return {"ttft_s": times[0] - t_start if times else None,
            "itl_s": [b - a for a, b in zip(times, times[1:])],
            "completion_tokens": (usage or {}).get("completion_tokens", 0), "error": error}


async def server_round(port: int, prompts: list[str], max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, p, max_tokens, t0) for p in prompts))
        wall = time.perf_counter() - t0
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    itls = [x for r in results for x in r["itl_s"]]
    errors = [r["error"] for r in results if r["error"]]
    tokens = sum(r["completion_tokens"] for r in results)
    return {"wall_s": wall, "tok_s": tokens / wall, "completion_tokens": tokens, "errors": errors,
            "ttft_p50_s": pct(ttfts, 50) if ttfts else None, "ttft_p99_s": pct(ttfts, 99) if ttfts else None,
            "itl_p50_s": pct(itls, 50) if itls else None, "itl_p99_s": pct(itls, 99) if itls else None}


# --------------------------------------------------------------------------------------------- offline side
def offline_round(engine: LLMEngine, prompts: list[str], max_tokens: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [encode_chat([{"role": "user", "content": p}], engine.tokenizer) for p in prompts]
    t0 = time.perf_counter()
    for i, prompt_ids in enumerate(ids):
        engine.add_request(str(i), {"prompt_token_ids": prompt_ids}, params)
    tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += out.usage.completion_tokens
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tok_s": tokens / wall, "completion_tokens": tokens}


def median_round(rounds: list[dict]) -> dict:
    return sorted(rounds, key=lambda r: r["tok_s"])[len(rounds) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same on both sides")
    ap.add_argument("--runs", type=int, default=5, help="timed rounds per side (median reported)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# server bench: small_moe ({model_stats(small_moe()).total_params / 1e6:.1f}M params), float32 CPU; "
          f"torch {torch.__version__}, threads {args.threads} both sides (server OMP_NUM_THREADS={args.threads}), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, cpus {os.cpu_count()}; "
          f"{args.clients} clients x {args.max_tokens} tokens, runs {args.runs} (median)")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, data = os.path.join(tmp, "ckpt"), os.path.join(tmp, "data")
        t0 = time.perf_counter()
        tokenizer = make_checkpoint(ckpt)
        print(f"checkpoint + tokenizer (vocab {tokenizer.vocab_size}) in {time.perf_counter() - t0:.1f} s")

        # both sides live at once; their rounds alternate, so load from other jobs falls on both alike
        port = free_port()
        proc = start_server(ckpt, data, port, args.threads, os.path.join(tmp, "server.log"))
        rounds, off_rounds = [], []
        try:
            engine = LLMEngine.from_pretrained(ckpt, EngineConfig())  # the server's engine options exactly
            asyncio.run(server_round(port, prompts_for("warm", args.clients), 8))
            offline_round(engine, prompts_for("warm", args.clients), 8)
            for r in range(args.runs):  # the same fresh prompts on both sides in each round
                rounds.append(asyncio.run(server_round(port, prompts_for(f"r{r}", args.clients), args.max_tokens)))
                off_rounds.append(offline_round(engine, prompts_for(f"r{r}", args.clients), args.max_tokens))
        finally:
            rc = stop_server(proc)
        srv, off = median_round(rounds), median_round(off_rounds)
        errors = sum(len(r["errors"]) for r in rounds)
        first_errors = [e for r in rounds for e in r["errors"]][:3]

    # headline: the median of paired per-round ratios (each pair ran back to back, under the same outside
    # load); the ratio of the two medians is printed too, but drifts with load that changes between rounds
    round_ratios = [a["tok_s"] / b["tok_s"] for a, b in zip(rounds, off_rounds)]
    ratio = statistics.median(round_ratios)
    ratio_of_medians = srv["tok_s"] / off["tok_s"]
    ms = 1e3
    print(f"\n{args.clients} concurrent streaming chat requests x {args.max_tokens} tokens (ignore_eos, greedy)")
    print("| side | wall s | completion tokens | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    print(f"| server (HTTP, SSE) | {srv['wall_s']:.2f} | {srv['completion_tokens']} | {srv['tok_s']:.0f} | "
          f"{srv['ttft_p50_s'] * ms:.0f} / {srv['ttft_p99_s'] * ms:.0f} | "
          f"{srv['itl_p50_s'] * ms:.1f} / {srv['itl_p99_s'] * ms:.1f} | {errors} |")
    print(f"| offline LLMEngine | {off['wall_s']:.2f} | {off['completion_tokens']} | {off['tok_s']:.0f} | - | - | - |")
    print(f"server / offline throughput, median of per-round ratios: {ratio:.2f}x (target >= 0.9; "
          f"per round {[round(x, 2) for x in round_ratios]}, ratio of medians {ratio_of_medians:.2f}x); "
          f"errors {errors} (target 0); "
          f"server {rc}; per-round tok/s: server {[round(r['tok_s']) for r in rounds]}, "
          f"offline {[round(r['tok_s']) for r in off_rounds]}")
    if first_errors:
        print("first errors:", *first_errors, sep="\n  ")
    print(json.dumps({"bench": "server", "model": "small_moe", "torch": torch.__version__, "threads": args.threads,
                      "clients": args.clients, "max_tokens": args.max_tokens, "runs": args.runs,
                      "server": {k: v for k, v in srv.items() if k != "errors"}, "server_errors": errors,
                      "server_round_tok_s": [r["tok_s"] for r in rounds], "offline": off,
                      "offline_round_tok_s": [r["tok_s"] for r in off_rounds],
                      "ratio": round(ratio, 3),  # median of per-round ratios
                      "round_ratios": [round(x, 3) for x in round_ratios],
                      "ratio_of_medians": round(ratio_of_medians, 3), "server_shutdown": rc}))


if __name__ == "__main__":
    main()
