"""How the benchmarks time a runtime and measure its CUDA memory."""

from __future__ import annotations

import time

SECONDS_PER_RUNTIME = 5.0  # timed runs stop after about this long (once MIN_RUNS are done)
MIN_RUNS = 3


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def time_runs(call, device: str, warmup: int, max_runs: int, min_runs: int = MIN_RUNS) -> list[float]:
    """Milliseconds of each timed run, after `warmup` untimed ones: at least min_runs, then more until
    max_runs or about SECONDS_PER_RUNTIME. Each run lies between a device synchronisation and a clock read:
    CUDA events would miss ONNX Runtime's own stream."""
    for _ in range(warmup):
        call()
    synchronize(device)
    times = []
    while len(times) < max_runs and (len(times) < min_runs or sum(times) < SECONDS_PER_RUNTIME * 1e3):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
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
