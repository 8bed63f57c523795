"""Gateway replicas: streaming throughput through two `openr2 serve --upstream` gateways on one PostgreSQL ledger
vs one.

One upstream, `python -m openr2 serve` over the tiny chat test model (tests/checkpoints.py, --no-compile: a fast
upstream, so that the gateways' own work per token shows), and two gateways, `python -m openr2 serve --upstream
<it> --database-url <db>`, sharing a throw-away PostgreSQL cluster (tests/pg_cluster.py; or --database-url),
each with a per-key rate limit (`--requests-per-min`, high enough never to refuse) so that every request pays
its admission round trip to the database, as in a deployment. All are subprocesses on free 127.0.0.1 ports.
"one" rounds send --clients concurrent streaming chat requests to gateway A; "two" rounds send half to A and
half to B at once. Rounds alternate one, two after a warm-up, so load from other jobs falls on both alike.
Reported: each side's median round (tokens/s, TTFT, ITL), the median of the paired ratios two / one, and the
CPU the gateways and PostgreSQL's backends used per streamed token (from /proc: steadier than throughput on a
shared machine, and what says whether a second replica adds work per token). The client, the gateways, the
upstream and PostgreSQL share this machine's CPUs, as they would not in a deployment.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/gateway_replicas.py [--clients 32 --max-tokens 64 --runs 5]
Prints a header, a table, the ratio, and a final JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)  # run from a checkout

from bench.gateway import cpu_name, start  # noqa: E402
from bench.replicas import cluster_pids, proc_cpu_s  # noqa: E402
from bench.server import free_port, median_round, prompts_for, server_round, stop_server  # noqa: E402


async def split_round(ports: list[int], round_name: str, clients: int, max_tokens: int) -> dict:
    """clients streams split evenly over the gateways on `ports`, all at once: one result over all of them."""
    prompts = prompts_for(round_name, clients)
    share = -(-clients // len(ports))
    t0 = time.perf_counter()
    parts = await asyncio.gather(*(server_round(port, prompts[i * share:(i + 1) * share], max_tokens)
                                   for i, port in enumerate(ports)))
    wall = time.perf_counter() - t0
    tokens = sum(p["completion_tokens"] for p in parts)
    # percentiles across gateways: the worst part's (each part is the same size)
    return {"wall_s": wall, "tok_s": tokens / wall, "completion_tokens": tokens,
            "errors": [e for p in parts for e in p["errors"]],
            **{k: max(p[k] for p in parts) for k in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")}}


def main() -> None:
    from tests.checkpoints import save_tiny_chat_checkpoint
    from tests.pg_cluster import Cluster, find_bin_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5, help="timed rounds per side (median reported)")
    ap.add_argument("--database-url", default=None, help="an existing PostgreSQL database (default: a throw-away cluster)")
    args = ap.parse_args()
    print(f"# gateway replicas bench: tiny chat upstream (not compiled), 2 gateways on one PostgreSQL vs 1, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, cpus {os.cpu_count()} ({cpu_name()}); "
          f"{args.clients} streams x {args.max_tokens} tokens, runs {args.runs} (median); load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    cluster = None
    if args.database_url is None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise SystemExit("PostgreSQL not found (apt-get install postgresql), or pass --database-url")
        cluster = Cluster(bin_dir).start()
    procs = []
    try:
        url = args.database_url or cluster.create_database("bench_gateways")
        os.environ["OPENR2_DATABASE_URL"] = url  # the gateways read it: the URL stays out of the process list
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = os.path.join(tmp, "ckpt")
            save_tiny_chat_checkpoint(ckpt)
            up_port = free_port()
            procs.append(start(["--model", ckpt, "--data-dir", os.path.join(tmp, "up"), "--no-compile"], 1,
                               os.path.join(tmp, "up.log"), up_port))
            gw_ports = [free_port(), free_port()]
            for i, port in enumerate(gw_ports):
                procs.append(start(["--model", ckpt, "--upstream", f"http://127.0.0.1:{up_port}",
                                    "--requests-per-min", "1000000"], 1, os.path.join(tmp, f"gw{i}.log"), port))
            sides = {"one": gw_ports[:1], "two": gw_ports}
            for side, ports in sides.items():  # warm-up
                asyncio.run(split_round(ports, f"warm-{side}", args.clients, 8))
            rounds = {side: [] for side in sides}
            gateway_pids = [p.pid for p in procs[1:]]
            for r in range(args.runs):
                for side, ports in sides.items():
                    pg_pids = cluster_pids(cluster.data) if cluster else []
                    before = proc_cpu_s(gateway_pids), proc_cpu_s(pg_pids)
                    result = asyncio.run(split_round(ports, f"{side}{r}", args.clients, args.max_tokens))
                    tokens = max(result["completion_tokens"], 1)
                    result["gateway_cpu_ms_per_token"] = (proc_cpu_s(gateway_pids) - before[0]) * 1e3 / tokens
                    result["postgres_cpu_ms_per_token"] = (proc_cpu_s(pg_pids) - before[1]) * 1e3 / tokens
                    rounds[side].append(result)
    finally:
        for proc in procs:
            stop_server(proc)
        if cluster is not None:
            cluster.stop()

    ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(rounds["one"], rounds["two"])]
    ratio = statistics.median(ratios)
    errors = {side: sum(len(r["errors"]) for r in rs) for side, rs in rounds.items()}
    ms = 1e3
    print(f"\n{args.clients} concurrent streaming chat requests x {args.max_tokens} tokens (ignore_eos, greedy)")
    print("| gateways | wall s | completion tokens | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for side in rounds:
        row = median_round(rounds[side])
        print(f"| {side} | {row['wall_s']:.2f} | {row['completion_tokens']} | {row['tok_s']:.0f} | "
              f"{row['ttft_p50_s'] * ms:.0f} / {row['ttft_p99_s'] * ms:.0f} | "
              f"{row['itl_p50_s'] * ms:.1f} / {row['itl_p99_s'] * ms:.1f} | {errors[side]} |")
    for side, rs in rounds.items():
        print(f"{side}: gateway CPU {statistics.median(r['gateway_cpu_ms_per_token'] for r in rs):.3f} ms per token, "
              f"PostgreSQL {statistics.median(r['postgres_cpu_ms_per_token'] for r in rs):.3f} ms per token "
              f"(medians over rounds)")
    print(f"two / one throughput, median of per-round ratios: {ratio:.3f}x (per round "
          f"{[round(x, 3) for x in ratios]}); load average {os.getloadavg()[0]:.1f} at the end")
    print(json.dumps({"bench": "gateway_replicas", "cpu": cpu_name(), "cpus": os.cpu_count(), "clients": args.clients,
                      "max_tokens": args.max_tokens, "runs": args.runs, "ratio": round(ratio, 4),
                      "round_ratios": [round(x, 4) for x in ratios], "errors": errors,
                      "cpu_ms_per_token": {side: {k: round(statistics.median(r[f"{k}_cpu_ms_per_token"] for r in rs), 4)
                                                  for k in ("gateway", "postgres")} for side, rs in rounds.items()},
                      **{side: {k: v for k, v in median_round(rs).items() if k != "errors"}
                         for side, rs in rounds.items()}}))


if __name__ == "__main__":
    main()
