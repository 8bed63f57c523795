"""Replicas: batch lines per second through one `openr2 serve` on a PostgreSQL ledger, and through two sharing it.

Starts a throw-away PostgreSQL cluster (tests/pg_cluster.py: a unix socket in a temp dir; or --database-url)
and two `python -m openr2 serve --database-url ...` replicas of one checkpoint (the tiny chat test model by
default, so that the ledger's share of the work shows; --model for another) on free 127.0.0.1 ports. Each
round uploads a batch of --lines chat lines to replica A and times it from creation to `completed` (the
output file written). "one" rounds run with replica B stopped (SIGSTOP: it holds no claims between
batches, so it is simply absent); "two" rounds with it running, sharing the queue; "sqlite" rounds run a
third server on its own SQLite ledger (the embedded default) with both replicas stopped, for what the
PostgreSQL ledger costs one server. Rounds alternate sqlite, one, two, ..., so load from other jobs falls on
each alike, and each round records the CPU-seconds
other processes used meanwhile (bench/common.py) and the replicas' own CPU-seconds. Both replicas share this machine's CPUs: on a machine
with few cores, two replicas compete for them, which is what the ratio shows there.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/replicas.py [--lines 64] [--max-tokens 16] [--rounds 3]
Prints a header, one line per round, a table (median lines/s of each, the ratio), and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from bench.common import busy_cpu_s, other_load  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_replica(model: str, url: str | None, name: str, data_dir: str | None = None) -> tuple[subprocess.Popen, str]:
    """A replica on the PostgreSQL database `url`, or (url None) a server on its own SQLite ledger in data_dir."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "OPENR2_DATABASE_URL"}
    if url:
        env["OPENR2_DATABASE_URL"] = url  # the URL stays out of the process list
    ledger = [] if url else ["--data-dir", data_dir]
    proc = subprocess.Popen([sys.executable, "-m", "openr2", "serve", "--model", model, "--port", str(port),
                             "--served-model-name", name, "--no-compile", *ledger], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise SystemExit(f"replica died: {proc.stderr.read().decode()[-2000:]}")
    raise SystemExit("replica did not start")


def proc_cpu_s(pids: list[int]) -> float:
    """CPU-seconds (user + system) the processes have used so far (Linux /proc; 0.0 elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def cluster_pids(data_dir: str) -> list[int]:
    """The postmaster of a local cluster and its children (the backends serving the replicas)."""
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            root = int(f.readline())
    except (OSError, ValueError):
        return []
    pids = [root]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == root:
                        pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def batch_file(n: int, max_tokens: int, name: str, round_: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"r{round_}-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": name, "max_tokens": max_tokens, "temperature": 0,
                                        "ignore_eos": True,
                                        "messages": [{"role": "user", "content": f"Count to {i}."}]}}) + "\n"
                   for i in range(n)).encode()


def run_batch(base: str, content: bytes) -> float:
    """Seconds from creating the batch to its completion."""
    with httpx.Client(base_url=f"{base}/v1", timeout=60) as http:
        file_id = http.post("/files", files={"file": ("b.jsonl", content)}, data={"purpose": "batch"}).json()["id"]
        start = time.perf_counter()
        batch = http.post("/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                            "completion_window": "24h"}).json()
        while (b := http.get(f"/batches/{batch['id']}").json())["status"] not in ("completed", "failed",
                                                                                   "cancelled", "expired"):
            time.sleep(0.02)
        took = time.perf_counter() - start
    if b["status"] != "completed" or b["request_counts"]["failed"]:
        raise SystemExit(f"batch ended {b['status']}: {b['request_counts']} {b.get('errors')}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the tiny chat test model)")
    ap.add_argument("--database-url", default=None, help="an existing PostgreSQL database (default: a throw-away cluster)")
    args = ap.parse_args()

    from tests.checkpoints import save_tiny_chat_checkpoint
    from tests.pg_cluster import Cluster, find_bin_dir

    tmp = tempfile.mkdtemp(prefix="openr2-bench-replicas-")
    model = args.model
    if model is None:
        model = os.path.join(tmp, "tiny")
        save_tiny_chat_checkpoint(model)
    cluster = None
    url = args.database_url
    if url is None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise SystemExit("PostgreSQL not found: apt-get install postgresql, or pass --database-url")
        cluster = Cluster(bin_dir).start()
        url = cluster.create_database("bench")
    print(f"# replicas: {args.lines} lines x {args.max_tokens} tokens per batch, {args.rounds} rounds each, "
          f"model {'tiny (tests/checkpoints.py)' if args.model is None else args.model}, {os.cpu_count()} CPUs, "
          f"PostgreSQL {'throw-away cluster (fsync off)' if cluster else 'given'}")
    procs = []
    try:
        a, base_a = start_replica(model, url, "m")
        b, _ = start_replica(model, url, "m")
        lite, base_lite = start_replica(model, None, "m", os.path.join(tmp, "sqlite-data"))
        procs = [a, b, lite]
        run_batch(base_a, batch_file(8, args.max_tokens, "m", -1))  # warm-up, both replicas
        run_batch(base_lite, batch_file(8, args.max_tokens, "m", -1))
        kinds = {"sqlite": ([lite], base_lite), "one": ([a], base_a), "two": ([a, b], base_a)}
        times: dict[str, list[float]] = {k: [] for k in kinds}
        loads: dict[str, list[float]] = {k: [] for k in kinds}
        for round_ in range(args.rounds):
            for i, (kind, (running, base)) in enumerate(kinds.items()):
                for p in procs:  # only this round's servers run (the others hold no claims between batches)
                    p.send_signal(signal.SIGCONT if p in running else signal.SIGSTOP)
                pg = cluster_pids(cluster.data) if cluster else []
                before, replicas_before, pg_before = busy_cpu_s(), proc_cpu_s([p.pid for p in procs]), proc_cpu_s(pg)
                took = run_batch(base, batch_file(args.lines, args.max_tokens, "m", round_ * 3 + i))
                load = other_load(before, busy_cpu_s(), took)
                replicas_cpu = proc_cpu_s([p.pid for p in procs]) - replicas_before
                pg_cpu = proc_cpu_s(pg) - pg_before  # backends that ended during the round are not counted
                times[kind].append(took)
                # other_load counts everything but this process: take the replicas' and PostgreSQL's CPU out
                others = (load[0] - replicas_cpu - pg_cpu) / (took * (os.cpu_count() or 1)) if load else float("nan")
                loads[kind].append(others)
                print(f"round {round_} {kind:>6}: {took:7.2f} s  {args.lines / took:7.1f} lines/s  replicas "
                      f"{replicas_cpu:5.2f} CPU-s ({replicas_cpu / args.lines * 1000:.1f} ms a line)  PostgreSQL "
                      f"{pg_cpu:4.2f} CPU-s  other jobs {max(others, 0):.0%} of the machine")
        for p in procs:
            p.send_signal(signal.SIGCONT)
        lite_s, one, two = (args.lines / statistics.median(times[k]) for k in ("sqlite", "one", "two"))
        print(f"\n| server(s) | lines/s (median) |\n|---|---|\n| one, SQLite ledger | {lite_s:.1f} |\n"
              f"| one replica, PostgreSQL | {one:.1f} |\n| two replicas, PostgreSQL | {two:.1f} |\n"
              f"| ratio two/one (PostgreSQL) | {two / one:.2f}x |\n| ratio PostgreSQL/SQLite, one server | "
              f"{one / lite_s:.2f}x |")
        print(json.dumps({"bench": "replicas", "lines": args.lines, "max_tokens": args.max_tokens,
                          "rounds": args.rounds, "cpus": os.cpu_count(), "sqlite_lines_per_s": round(lite_s, 2),
                          "one_lines_per_s": round(one, 2),
                          "two_lines_per_s": round(two, 2), "ratio": round(two / one, 3),
                          "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
                          "other_jobs_share": {k: [round(x, 2) for x in v] for k, v in loads.items()}}))
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        if cluster:
            cluster.stop()


if __name__ == "__main__":
    main()
