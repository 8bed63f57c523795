"""Restart: how long until `openr2 serve` answers, the first time and once its compiled steps are on disk?

Starts `python -m openr2 serve` of the bundled demo model (compiled by default, as `make run`) as a
subprocess on a free 127.0.0.1 port, and times, from the moment the process is spawned:
  listening:  the first 200 from GET /health (the server listens only after LLMEngine.warm_up: the compiled
              decode steps for one and several rows are loaded or built by then);
  first completion: the response to one POST /v1/completions (8 tokens, greedy) sent right after.
The first start runs on empty caches (a fresh temporary directory for openr2's compiled steps, inductor's
cache and torch's C++ extensions: the paged-attention kernel is built too); each later start reuses them,
as a restart on the same machine would. --checkout times another copy of the code (say, an older commit
extracted with `git archive`) against the same model, with caches of its own; starts of the checkouts
alternate, so load from other jobs falls on each alike.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/restart.py [--restarts 3] [--checkout DIR ...]
Prints a header, one line per start, a table (first start, median restart), and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEMO = os.path.join(ROOT, "openr2", "assets", "openr2-demo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(checkout: str, model: str, cache: str, threads: int, timeout_s: float) -> dict:
    """One start of `openr2 serve` from `checkout` with its caches under `cache`: seconds to listening and to
    the first completion, the CPU seconds the server used (its whole life: start, one completion, shutdown;
    with its compiler subprocesses), and the load average around it."""
    port = free_port()
    env = {**os.environ, "OPENR2_CACHE_DIR": os.path.join(cache, "openr2"),
           "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"),
           "TORCH_EXTENSIONS_DIR": os.path.join(cache, "torch_extensions"),
           "OMP_NUM_THREADS": str(threads), "PYTHONPATH": checkout}
    cmd = [sys.executable, "-m", "openr2", "serve", "--model", model, "--served-model-name", "openr2-demo",
           "--host", "127.0.0.1", "--port", str(port), "--data-dir", os.path.join(cache, "data")]
    load_before = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=checkout, stdout=log, stderr=subprocess.STDOUT)
        try:
            listening = None
            while listening is None:
                if proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
                    log.seek(0)
                    raise SystemExit(f"FAIL: {checkout}: serve not listening ({proc.poll()}):\n{log.read().decode()}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        listening = time.perf_counter() - t0
                except httpx.HTTPError:
                    time.sleep(0.05)
            body = {"model": "openr2-demo", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=timeout_s)
            first = time.perf_counter() - t0
            if r.status_code != 200 or r.json()["usage"]["completion_tokens"] < 1:
                raise SystemExit(f"FAIL: {checkout}: completion {r.status_code}: {r.text[:300]}")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = cpu.ru_utime + cpu.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    return {"listening_s": round(listening, 2), "first_completion_s": round(first, 2), "cpu_s": round(cpu_s, 2),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEMO)
    ap.add_argument("--restarts", type=int, default=3, help="starts after the first (median reported)")
    ap.add_argument("--checkout", action="append", default=[], help="another copy of the code to time as well")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the server")
    ap.add_argument("--timeout", type=float, default=900, help="seconds a start may take")
    ap.add_argument("--cache", help="keep the caches here (DIR/0, DIR/1... per checkout) instead of a temporary "
                                    "directory: a second run's first start is then a restart too")
    args = ap.parse_args()
    import torch

    checkouts = [ROOT] + [os.path.abspath(c) for c in args.checkout]
    print(f"# restart bench: openr2 serve {os.path.relpath(args.model, ROOT)}, compiled (the default); torch "
          f"{torch.__version__}, OMP_NUM_THREADS={args.threads}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}, cpus {os.cpu_count()}; checkouts {checkouts}")
    results: dict[str, list[dict]] = {c: [] for c in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        caches = {c: os.path.join(args.cache or tmp, str(i)) for i, c in enumerate(checkouts)}
        for n in range(1 + args.restarts):
            for c in checkouts:
                r = start(c, args.model, caches[c], args.threads, args.timeout)
                results[c].append(r)
                print(f"{'first start' if n == 0 else f'restart {n}'} {c}: listening {r['listening_s']:.2f} s, "
                      f"first completion {r['first_completion_s']:.2f} s, server CPU {r['cpu_s']:.1f} s "
                      f"(load average {r['load_before']:.1f} "
                      f"-> {r['load_after']:.1f})", flush=True)
    print("\n| checkout | first start: listening / first completion s (CPU s) | restart (median): listening / "
          "first completion s (CPU s) | restarts' listening s |")
    print("|---|---|---|---|")
    summary = {}
    for c, rs in results.items():
        again = rs[1:] or rs
        med = {k: statistics.median(r[k] for r in again) for k in ("listening_s", "first_completion_s", "cpu_s")}
        summary[c] = {"first": rs[0], "restart_median": med, "restarts": rs[1:]}
        print(f"| {c} | {rs[0]['listening_s']:.1f} / {rs[0]['first_completion_s']:.1f} ({rs[0]['cpu_s']:.0f}) | "
              f"{med['listening_s']:.2f} / {med['first_completion_s']:.2f} ({med['cpu_s']:.1f}) | "
              f"{' '.join(str(r['listening_s']) for r in rs[1:])} |")
    print(f"target: a restart listening (compiled) in under 5 s: "
          f"{'met' if summary[ROOT]['restart_median']['first_completion_s'] < 5 else 'NOT met'} (this checkout)")
    print(json.dumps({"bench": "restart", "torch": torch.__version__, "threads": args.threads,
                      "model": os.path.relpath(args.model, ROOT), "results": summary}))


if __name__ == "__main__":
    main()
