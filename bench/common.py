"""Helpers shared by the benchmarks: a random transformers checkpoint, interleaved timing with the machine's
load beside it, driving an engine through a burst of requests, and the kernel-floor replay."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from openr2.config import ModelConfig


def cpu_name() -> str:
    """The CPU's model name (benchmarks name the CPU they ran on)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"

def make_hf_checkpoint(path: str, config: ModelConfig, seed: int, eval_mode: bool = True):
    """Random DeepseekV3ForCausalLM of `config`'s shape, every tensor perturbed, saved to `path`; returns its
    DeepseekV3Config."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf_config = DeepseekV3Config(**config.to_hf())
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hf_config).float()
    if eval_mode:
        model.eval()
    with torch.no_grad():
        # transformers initialises some tensors to constants (router weight zeros, norms ones, correction
        # bias zeros); a check on those would not see a mixed-up name or layout, so nudge them all.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand_like(b) * 0.1)
    model.save_pretrained(path)
    return hf_config


def busy_cpu_s() -> tuple[float, float] | None:
    """(CPU-seconds the whole machine has been busy, this process's CPU-seconds), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (sum(fields[:8]) - idle) / hz, own.user + own.system


def other_load(before: tuple[float, float] | None, after: tuple[float, float] | None,
               wall_s: float) -> tuple[float, float] | None:
    """(CPU-seconds other processes used between two busy_cpu_s() readings, their share of the machine), or
    None off Linux."""
    if not (before and after):
        return None
    other_cpu_s = max(0.0, (after[0] - before[0]) - (after[1] - before[1]))
    return other_cpu_s, other_cpu_s / (wall_s * (os.cpu_count() or 1))


def run_requests(engine, prompts: list, params, first_token_s: list | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> tuple[float, list[list[int]]]:
    """Seconds for an engine (openr2.engine.LLMEngine) to finish every prompt, all added at once, and the
    token ids of each (the first sample's); first_token_s, if given, gets the seconds until the first
    token of every request (the prompt's pass). clock: wall time, or time.process_time (this process's CPU
    seconds: what the run cost, without the time other processes held the CPU)."""
    start = clock()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    done, started = {}, set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first_token_s is not None and out.request_id not in started and out.outputs[0].token_ids:
                started.add(out.request_id)
                first_token_s.append(clock() - start)
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return clock() - start, [done[f"r{i}"] for i in range(len(prompts))]


def time_rows(rows: dict, runs: int, warmup: int) -> tuple[dict, float | None]:
    """(seconds per run of each row, the share of the machine other processes took meanwhile or None off
    Linux). Rounds are interleaved (row A, row B, ..., then again) so that a slow spell of a shared
    machine lands on every row alike instead of on whichever row happened to run then; how much other
    processes took is printed, so that a noisy run is visible."""
    for fn in rows.values():
        for _ in range(warmup):
            fn()
    before, t0 = busy_cpu_s(), time.perf_counter()
    times: dict = {name: [] for name in rows}
    for _ in range(runs):
        for name, fn in rows.items():
            t1 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t1)
    load = other_load(before, busy_cpu_s(), time.perf_counter() - t0)
    if load is None:
        return times, None
    other_cpu_s, other_frac = load
    print(f"# other processes used {other_cpu_s:.1f} CPU-s during timing ({other_frac:.0%} of the machine)"
          + ("  <- noisy run, numbers unreliable" if other_frac > 0.05 else ""))
    return times, other_frac


def cpu_time_rows(rows: dict, runs: int, warmup: int) -> tuple[dict, None]:
    """time_rows in this process's CPU seconds per call (with one thread, OMP_NUM_THREADS=1: the step's own
    work, whatever else runs on the machine); no load share to report."""
    for fn in rows.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in rows}
    for _ in range(runs):
        for name, fn in rows.items():
            t1 = time.process_time()
            fn()
            times[name].append(time.process_time() - t1)
    return times, None


aten = torch.ops.aten
# The kernels whose FLOPs the model itself needs: dense products and attention, forward and backward
# (under inference_mode the dispatcher shows linear and SDPA whole, with autograd their parts).
HEAVY_KERNELS = {
    aten.linear.default, aten.matmul.default, aten.mm.default, aten.mm.out, aten.addmm.default,
    aten.bmm.default, aten.baddbmm.default, aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
}


class HeavyKernelLog(TorchDispatchMode):
    """Records every heavy-kernel call (function, arguments) made while active, backward included."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HEAVY_KERNELS:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def heavy_kernel_replay(step) -> tuple[Callable[[], None], int]:
    """(replay, number of calls): `replay()` runs only the matmul and attention kernels that one call of
    `step` made, back to back, on the same tensors. Its time is a floor for any implementation that does
    these products with these kernels, whatever it does around them."""
    log = HeavyKernelLog()
    with log:
        step()

    def replay() -> None:
        with torch.no_grad():
            for func, args, kwargs in log.calls:
                func(*args, **kwargs)

    return replay, len(log.calls)
