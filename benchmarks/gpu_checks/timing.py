"""How the benchmarks time a runtime and measure its CUDA memory."""

from __future__ import annotations

import time
from typing import Callable

SECONDS_PER_RUNTIME = 5.0  # timed rounds stop after about this long per runtime (once MIN_RUNS are done)
MIN_RUNS = 3


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def time_interleaved(calls: dict[str, Callable[[], object]], device: str, warmup: int, max_runs: int,
                     min_runs: int = MIN_RUNS) -> dict[str, list[float]]:
    """Milliseconds of each timed run of each call, after `warmup` untimed runs of each: the calls take turns,
    one run each per round, for at least min_runs rounds, then more until max_runs or about
    SECONDS_PER_RUNTIME per call. Taking turns puts every runtime through the same spells of a shared
    machine's load; timing one runtime after another let a busy spell land on one of them alone (on the
    shared 2-core CPU, our eager's one-thread median at 4,096 tokens ranged from 312 to 397 ms over one day's
    runs). Each run lies between a device synchronisation and a clock read: CUDA events would miss ONNX
    Runtime's own stream."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    synchronize(device)
    times = {name: [] for name in calls}
    budget_ms = SECONDS_PER_RUNTIME * 1e3 * len(calls)
    rounds, elapsed_ms = 0, 0.0
    while rounds < max_runs and (rounds < min_runs or elapsed_ms < budget_ms):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
            elapsed_ms += times[name][-1]
        rounds += 1
    return times


def start_peak_allocation() -> int:
    """Reset torch's CUDA peak; the bytes allocated now, from which `peak_allocation_since` counts."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_allocation_since(allocated_before: int) -> int:
    """The most torch's CUDA allocations rose above `allocated_before` since `start_peak_allocation`."""
    import torch

    return torch.cuda.max_memory_allocated() - allocated_before


def free_device_bytes() -> int:
    """Free CUDA memory once torch has handed back its cached blocks."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]
