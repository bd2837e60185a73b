"""The exported graphs a run needs, each exported once into a temporary folder, many at once in worker
processes where the machine has the cores."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.gpu_checks.steps import log
from benchmarks.models import build_model

if TYPE_CHECKING:
    from benchmarks.gpu_checks.report import Results


def export_device(fmt: str, dtype: str, device: str) -> str:
    """Where a graph is exported: fp32 ONNX on the CPU (the file serves both execution providers), fp16 on
    CUDA (its runtime); TorchScript on the device that runs it (a trace records its device)."""
    if fmt == "onnx":
        return "cuda" if dtype == "fp16" else "cpu"
    return device


class Exports:
    """Each (model, format, dtype, export device, twin or not) exported once, into a temporary folder.
    `prepare` exports many at once in worker processes (an export is mostly single-threaded Python: 1 to 1.5
    minutes for `large` on one core, and verification needs eight of them); `get` exports what is missing."""

    def __init__(self, folder: Path, results: Results):
        self.folder = folder
        self.results = results
        self.paths: dict[tuple, Path] = {}
        self.failures: dict[tuple, str] = {}

    def key(self, name: str, fmt: str, dtype: str, runtime_device: str, replay: bool = False) -> tuple:
        return (name, fmt, dtype, export_device(fmt, dtype, runtime_device), replay)

    def path_for(self, key: tuple) -> Path:
        name, fmt, dtype, device, replay = key
        return self.folder / f"{name}-{dtype}-{device}{'-twin' if replay else ''}.{'onnx' if fmt == 'onnx' else 'pt'}"

    def record(self, key: tuple, seconds: float) -> None:
        name, fmt, dtype, device, replay = key
        path = self.path_for(key)
        self.results.exports.append({"model": name, "format": fmt + ("-twin" if replay else ""), "dtype": dtype,
                                     "device": device, "seconds": round(seconds, 1),
                                     "megabytes": round(graph_bytes(path) / 1e6, 1)})
        self.paths[key] = path

    def prepare(self, jobs: list[tuple[tuple, int]]) -> None:
        """Export every (key, max_length) not exported yet, in parallel where the machine has the cores."""
        import concurrent.futures
        import multiprocessing

        missing = [(key, max_length) for key, max_length in dict(jobs).items() if key not in self.paths]
        workers = min(len(missing), (os.cpu_count() or 1) // 2)
        if workers < 2:
            return  # `get` exports them one by one
        log(f"exporting {len(missing)} graphs in {workers} processes ...")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(export_in_worker, key, max_length, str(self.path_for(key))): key
                       for key, max_length in missing}
            for future in concurrent.futures.as_completed(futures):
                key = futures[future]
                try:
                    self.record(key, future.result())
                    log(f"exported {self.path_for(key).name}")
                except Exception as error:  # recorded once; `get` raises it for every step that needs the file
                    self.results.fail(f"export {self.path_for(key).name}", error)
                    self.failures[key] = f"{type(error).__name__}: {error}".splitlines()[0]
        self.results.save()

    def get(self, name: str, model, spec, fmt: str, dtype: str, runtime_device: str, replay: bool = False) -> Path:
        """The file for a runtime on `runtime_device` (`replay`: its verification twin), exported on first use."""
        key = self.key(name, fmt, dtype, runtime_device, replay)
        if key in self.failures:
            raise RuntimeError(f"export of {self.path_for(key).name} failed earlier: {self.failures[key]}")
        if key not in self.paths:
            log(f"exporting {self.path_for(key).name} ...")
            start = time.perf_counter()
            export_file(model, spec, key, self.path_for(key))
            self.record(key, time.perf_counter() - start)
        return self.paths[key]


def export_file(model, spec, key: tuple, path: Path) -> None:
    from exporters.onnx import export_onnx
    from exporters.torchscript import export_torchscript

    _, fmt, dtype, device, replay = key
    exporter = export_onnx if fmt == "onnx" else export_torchscript
    exporter(model, spec, path, dtype=dtype, device=device, replay=replay)


def export_in_worker(key: tuple, max_length: int, path: str) -> float:
    """In a worker process: the same model as the parent's (same seed), exported to path; its seconds."""
    import torch

    torch.set_num_threads(2)
    model, spec = build_model(key[0], max_length)
    start = time.perf_counter()
    export_file(model, spec, key, Path(path))
    return time.perf_counter() - start


def graph_bytes(path: Path) -> int:
    """The file and its external-data file, if any."""
    return sum(candidate.stat().st_size for candidate in (path, path.with_name(path.name + ".data"))
               if candidate.exists())
