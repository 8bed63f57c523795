"""Gateway: what does `openr2 serve --upstream` add over calling the upstream directly?

One upstream, `python -m openr2 serve` over bench/server.py's checkpoint (small_moe, float32, CPU, compiled
decode step unless --no-compile), and one gateway, `python -m openr2 serve --upstream <it>` over the same
checkpoint directory (its tokenizer and chat template), both subprocesses on free 127.0.0.1 ports. Each round
sends N concurrent streaming chat requests (bench/server.py's client: ignore_eos, greedy, include_usage) to
the upstream directly, then N to the gateway, with the same prompts but for a first word naming the side, so
that neither side's prompts hit the prefix cache the other filled; rounds alternate after a warm-up round
each, so outside load falls on both. Reported per side: the median round's tokens/s, TTFT p50/p99 and ITL
p50/p99; the headline figures are the median over rounds of the paired differences: throughput ratio
gateway / direct (target >= 0.95) and added TTFT p50 / p99 (target <= 5 ms). Then --single lone requests
(1 stream, 4 tokens) alternate between the sides: the TTFT a request pays for the gateway's hop when nothing
queues, median and p90 of the paired differences. The client, the gateway and the
upstream share this machine's CPUs, as they would not in a deployment: on a small machine the gateway's own
CPU time comes out of the engine's.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/gateway.py [--clients 32 --max-tokens 64 --runs 5]
Prints a header, a table, the ratios against their targets, and a final JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)  # run from a checkout

import torch  # noqa: E402

from bench.common import cpu_name  # noqa: E402
from bench.replicas import proc_cpu_s  # noqa: E402
from bench.server import (  # noqa: E402
    MODEL_NAME,
    free_port,
    make_checkpoint,
    median_round,
    prompts_for,
    server_round,
    stop_server,
    wait_healthy,
)


def start(args: list[str], threads: int, log_path: str, port: int, cpus: set[int] | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "openr2", "serve", "--port", str(port), "--served-model-name", MODEL_NAME, *args]
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(cmd, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, cwd=ROOT,
                            preexec_fn=pin)
    return wait_healthy(proc, port, log_path)


def side_prompts(side: str, round_name: str, n: int) -> list[str]:
    return [f"{side} {p}" for p in prompts_for(round_name, n)]


async def lone_ttfts(ports: dict[str, int], n: int) -> dict[str, list[float]]:
    """TTFT of n lone requests per side, alternating sides, each with a fresh prompt."""
    out = {side: [] for side in ports}
    for i in range(n):
        for side, port in ports.items():
            result = await server_round(port, side_prompts(side, f"lone{i}", 1), 4)
            out[side].append(result["ttft_p50_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="the upstream's torch threads")
    ap.add_argument("--runs", type=int, default=5, help="timed rounds per side (median reported)")
    ap.add_argument("--no-compile", action="store_true", help="the upstream without its compiled decode step")
    ap.add_argument("--single", type=int, default=30, help="lone requests per side for the unloaded TTFT")
    ap.add_argument("--pin", action="store_true",
                    help="the upstream on the first half of the CPUs, the gateway and the client on the rest, as "
                         "when the gateway runs beside (not on) the engine's machine")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    engine_cpus, other_cpus = (set(cpus[:len(cpus) // 2]), set(cpus[len(cpus) // 2:])) if args.pin else (None, None)
    if args.pin:
        os.sched_setaffinity(0, other_cpus)  # the client
    print(f"# gateway bench: small_moe upstream, float32 CPU, torch {torch.__version__}, upstream threads "
          f"{args.threads}{' (not compiled)' if args.no_compile else ''}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, cpus {os.cpu_count()} ({cpu_name()}); "
          f"{args.clients} streams x {args.max_tokens} tokens, runs {args.runs} (median); load average "
          f"{os.getloadavg()[0]:.1f} at the start"
          + (f"; upstream on CPUs {sorted(engine_cpus)}, gateway and client on {sorted(other_cpus)}" if args.pin else ""))

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        make_checkpoint(ckpt)
        up_port, gw_port = free_port(), free_port()
        upstream = start(["--model", ckpt, "--data-dir", os.path.join(tmp, "up"),
                          *(["--no-compile"] if args.no_compile else [])], args.threads,
                         os.path.join(tmp, "up.log"), up_port, engine_cpus)
        gateway = None
        direct, through, gateway_cpu_ms = [], [], []  # and the gateway's CPU-ms per streamed token, per round
        try:
            gateway = start(["--model", ckpt, "--data-dir", os.path.join(tmp, "gw"), "--upstream",
                             f"http://127.0.0.1:{up_port}"], 1, os.path.join(tmp, "gw.log"), gw_port, other_cpus)
            for side, port in (("direct", up_port), ("gateway", gw_port)):  # warm-up
                asyncio.run(server_round(port, side_prompts(side, "warm", args.clients), 8))
            for r in range(args.runs):
                direct.append(asyncio.run(server_round(up_port, side_prompts("direct", f"r{r}", args.clients),
                                                       args.max_tokens)))
                cpu0 = proc_cpu_s([gateway.pid])
                through.append(asyncio.run(server_round(gw_port, side_prompts("gateway", f"r{r}", args.clients),
                                                        args.max_tokens)))
                gateway_cpu_ms.append((proc_cpu_s([gateway.pid]) - cpu0) * 1e3 / max(1, through[-1]["completion_tokens"]))
            lone = asyncio.run(lone_ttfts({"direct": up_port, "gateway": gw_port}, args.single))
        finally:
            if gateway is not None:
                stop_server(gateway)
            stop_server(upstream)

    errors = {"direct": sum(len(r["errors"]) for r in direct), "gateway": sum(len(r["errors"]) for r in through)}
    ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(direct, through)]
    added_p50 = [b["ttft_p50_s"] - a["ttft_p50_s"] for a, b in zip(direct, through)]
    added_p99 = [b["ttft_p99_s"] - a["ttft_p99_s"] for a, b in zip(direct, through)]
    ratio, add50, add99 = statistics.median(ratios), statistics.median(added_p50), statistics.median(added_p99)
    d, g = median_round(direct), median_round(through)
    lone_added = sorted(b - a for a, b in zip(lone["direct"], lone["gateway"]))
    lone50, lone90 = statistics.median(lone_added), lone_added[int(0.9 * (len(lone_added) - 1))]
    ms = 1e3
    print(f"\n{args.clients} concurrent streaming chat requests x {args.max_tokens} tokens (ignore_eos, greedy)")
    print("| side | wall s | completion tokens | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for name, row, err in (("upstream directly", d, errors["direct"]), ("through the gateway", g, errors["gateway"])):
        print(f"| {name} | {row['wall_s']:.2f} | {row['completion_tokens']} | {row['tok_s']:.0f} | "
              f"{row['ttft_p50_s'] * ms:.0f} / {row['ttft_p99_s'] * ms:.0f} | "
              f"{row['itl_p50_s'] * ms:.1f} / {row['itl_p99_s'] * ms:.1f} | {err} |")
    print(f"gateway / direct throughput, median of per-round ratios: {ratio:.3f}x (target >= 0.95; per round "
          f"{[round(x, 3) for x in ratios]})")
    print(f"added TTFT, median of per-round differences: p50 {add50 * ms:+.1f} ms, p99 {add99 * ms:+.1f} ms "
          f"(target <= 5 ms; per round p50 {[round(x * ms, 1) for x in added_p50]})")
    cpu_per_token = statistics.median(gateway_cpu_ms)
    print(f"gateway CPU per streamed token (/proc, 10 ms ticks), median of rounds: {cpu_per_token:.3f} ms "
          f"(per round {[round(x, 3) for x in gateway_cpu_ms]})")
    print(f"lone requests ({args.single} per side, alternating): TTFT median direct "
          f"{statistics.median(lone['direct']) * ms:.1f} ms, gateway {statistics.median(lone['gateway']) * ms:.1f} ms; "
          f"added median {lone50 * ms:+.1f} ms, p90 {lone90 * ms:+.1f} ms (target <= 5 ms); load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    print(json.dumps({"bench": "gateway", "model": "small_moe", "torch": torch.__version__, "cpu": cpu_name(),
                      "cpus": os.cpu_count(), "clients": args.clients, "max_tokens": args.max_tokens,
                      "runs": args.runs, "compiled": not args.no_compile, "pinned": args.pin, "ratio": round(ratio, 4),
                      "round_ratios": [round(x, 4) for x in ratios], "added_ttft_p50_ms": round(add50 * ms, 2),
                      "added_ttft_p99_ms": round(add99 * ms, 2), "lone_added_ttft_median_ms": round(lone50 * ms, 2),
                      "lone_added_ttft_p90_ms": round(lone90 * ms, 2), "errors": errors,
                      "gateway_cpu_ms_per_token": round(cpu_per_token, 4),
                      "direct": {k: v for k, v in d.items() if k != "errors"},
                      "gateway": {k: v for k, v in g.items() if k != "errors"}}))


if __name__ == "__main__":
    main()
