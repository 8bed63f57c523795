"""Gateway versions: the gateway's CPU per streamed token, throughput and TTFT, of this checkout's code against
another checkout's (say, the commit before a change), over one shared upstream.

One upstream, `python -m openr2 serve` over the tiny chat test model (tests/checkpoints.py; or bench/server.py's
small_moe with --upstream-model small_moe), --no-compile, one torch thread, and two gateways `python -m openr2 serve --upstream <it>`,
one run from each checkout (its PYTHONPATH), all subprocesses on free 127.0.0.1 ports. With two or more CPUs the
upstream is pinned to the first, the gateways and this client to the last (as when a gateway does not share the
engine's CPUs). Each round sends --clients concurrent streaming chat requests x --max-tokens (bench/server.py's
client: ignore_eos, greedy, include_usage) to the upstream directly, then to each gateway, the gateways' order
alternating by round. Reported per side: the median over rounds of tokens/s, TTFT p50 and the gateway's CPU per
streamed token (/proc, 10 ms ticks): the CPU figure is the one a loaded machine leaves readable.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/gateway_versions.py --baseline /path/to/other/checkout
Prints a table and a final JSON line.
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

from bench.common import cpu_name  # noqa: E402
from bench.replicas import proc_cpu_s  # noqa: E402
from bench.server import MODEL_NAME, free_port, make_checkpoint, server_round, stop_server, wait_healthy  # noqa: E402


def start(root: str, args: list[str], log_path: str, port: int, cpus: set[int]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    cmd = [sys.executable, "-m", "openr2", "serve", "--port", str(port), "--served-model-name", MODEL_NAME, *args]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, cwd=root,
                            preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    return wait_healthy(proc, port, log_path)


def main() -> None:
    from tests.checkpoints import save_tiny_chat_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="the other checkout (its root directory)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=6, help="timed rounds (median reported)")
    ap.add_argument("--upstream-model", choices=["tiny", "small_moe"], default="tiny",
                    help="tiny: a fast upstream (its events reach the gateway several per read); small_moe: "
                         "bench/server.py's, slower (one event per read: the gateway's full cost per token)")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    up_cpus, gw_cpus = ({cpus[0]}, {cpus[-1]}) if len(cpus) > 1 else (set(cpus), set(cpus))
    os.sched_setaffinity(0, gw_cpus)  # the client
    sides = {"baseline": os.path.abspath(args.baseline), "this": os.path.abspath(ROOT)}
    print(f"# gateway versions: {args.upstream_model} upstream (not compiled), {args.clients} streams x {args.max_tokens} tokens, "
          f"runs {args.runs}; cpus {os.cpu_count()} ({cpu_name()}), upstream on {sorted(up_cpus)}, gateways and "
          f"client on {sorted(gw_cpus)}; load average {os.getloadavg()[0]:.1f} at the start; baseline "
          f"{sides['baseline']}")
    rows: dict[str, list[tuple[float, float, float]]] = {"direct": [], "baseline": [], "this": []}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        if args.upstream_model == "tiny":
            save_tiny_chat_checkpoint(ckpt)
        else:
            make_checkpoint(ckpt)
        up_port = free_port()
        upstream = start(ROOT, ["--model", ckpt, "--no-compile", "--data-dir", os.path.join(tmp, "up"),
                                "--block-size", "16", "--num-blocks", "4096"], os.path.join(tmp, "up.log"), up_port,
                         up_cpus)
        gateways = {}
        try:
            for side, root in sides.items():
                port = free_port()
                gateways[side] = (start(root, ["--model", ckpt, "--data-dir", os.path.join(tmp, side), "--upstream",
                                               f"http://127.0.0.1:{up_port}"], os.path.join(tmp, f"{side}.log"),
                                        port, gw_cpus), port)
            for side, (_, port) in gateways.items():  # warm-up
                asyncio.run(server_round(port, [f"warm {side} {i}" for i in range(args.clients)], 8))
            for r in range(args.runs):
                d = asyncio.run(server_round(up_port, [f"d{r} q {i}" for i in range(args.clients)], args.max_tokens))
                rows["direct"].append((d["tok_s"], d["ttft_p50_s"], 0.0))
                order = list(gateways.items()) if r % 2 == 0 else list(reversed(gateways.items()))
                for side, (proc, port) in order:
                    cpu0 = proc_cpu_s([proc.pid])
                    x = asyncio.run(server_round(port, [f"{side}{r} q {i}" for i in range(args.clients)],
                                                 args.max_tokens))
                    if x["errors"]:
                        raise RuntimeError(f"{side}: {x['errors'][:2]}")
                    rows[side].append((x["tok_s"], x["ttft_p50_s"],
                                       (proc_cpu_s([proc.pid]) - cpu0) * 1e3 / x["completion_tokens"]))
        finally:
            for proc, _ in gateways.values():
                stop_server(proc)
            stop_server(upstream)
    summary = {side: {"tok_s": statistics.median(r[0] for r in rs), "ttft_p50_ms": statistics.median(r[1] for r in rs) * 1e3,
                      "cpu_ms_per_token": statistics.median(r[2] for r in rs),
                      "cpu_ms_per_token_rounds": [round(r[2], 4) for r in rs]} for side, rs in rows.items()}
    print("| side | tok/s (median) | TTFT p50 ms (median) | gateway CPU ms / token (median; rounds) |")
    print("|---|---|---|---|")
    for side, s in summary.items():
        print(f"| {side} | {s['tok_s']:.0f} | {s['ttft_p50_ms']:.0f} | {s['cpu_ms_per_token']:.3f}; "
              f"{s['cpu_ms_per_token_rounds']} |")
    ratio = summary["this"]["cpu_ms_per_token"] / summary["baseline"]["cpu_ms_per_token"]
    print(f"CPU per token this / baseline: {ratio:.2f}x; load average {os.getloadavg()[0]:.1f} at the end")
    print(json.dumps({"bench": "gateway_versions", "upstream_model": args.upstream_model, "clients": args.clients, "max_tokens": args.max_tokens,
                      "runs": args.runs, "cpu": cpu_name(), "cpu_ratio": round(ratio, 3), **summary}))


if __name__ == "__main__":
    main()
