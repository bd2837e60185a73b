"""The machine a run measured: Python, torch and its CUDA device, onnxruntime and its providers, CPU, load."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment() -> dict:
    import torch

    values = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_cuda_version": torch.version.cuda,
        "cpu": f"{cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        "load_average_start": load_average(),
        "hostname": platform.node(),
    }
    try:
        import onnxruntime

        values["onnxruntime"] = onnxruntime.__version__
        values["onnxruntime_providers_available"] = list(onnxruntime.get_available_providers())
    except ImportError as error:
        values["onnxruntime"] = f"not importable: {error}"
        values["onnxruntime_providers_available"] = []
    return values


def load_average() -> list[float]:
    return [round(load, 2) for load in os.getloadavg()]


def environment_lines(command: str, load_before: tuple, load_after: tuple, packages: tuple[str, ...]) -> list[str]:
    """A results file's environment: processor, load average before and after the run, the versions of
    `packages` and Python, the command."""
    import importlib.metadata

    versions = {package: importlib.metadata.version(package) for package in packages}
    return [f"- processor: {cpu_name()}, {os.cpu_count()} cores",
            f"- load average (1, 5, 15 min) before: {', '.join(f'{value:.2f}' for value in load_before)}; after: "
            f"{', '.join(f'{value:.2f}' for value in load_after)}",
            "- " + ", ".join(f"{package} {version}" for package, version in versions.items()) + f", Python "
            f"{platform.python_version()}",
            f"- command: `{command}`"]


def card_name(device: str, env: dict) -> str:
    """Named on every figure: the GPU for CUDA rows, the processor for CPU rows."""
    return env["cuda_device"] if device == "cuda" else f"CPU {cpu_name()}"
