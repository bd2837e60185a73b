"""The exported graphs a run needs, each exported once into a temporary folder, many at once in worker
processes where the machine has the cores."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from benchmarks.gpu_checks.steps import log
from benchmarks.models import MODEL_NAMES, build_model

if TYPE_CHECKING:
    from benchmarks.gpu_checks.report import Results


# File suffix of each format.
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "aoti": ".pt2"}


def export_device(fmt: str, dtype: str, device: str) -> str:
    """Where a graph is exported: fp32 ONNX on the CPU (the file serves both execution providers), fp16 on
    CUDA (its runtime); TorchScript and AOTInductor packages on the device that runs them (a trace records its
    device; a package is compiled for one)."""
    if fmt == "onnx":
        return "cuda" if dtype == "fp16" else "cpu"
    return device


class ExportKey(NamedTuple):
    """One exported file: the model, its format, dtype and export device, whether it is the verification twin,
    and the lowering of the registry's ops (`custom_ops` of exporters.onnx.export_onnx; "auto" for TorchScript)."""
    name: str
    fmt: str
    dtype: str
    device: str
    replay: bool
    custom_ops: str


def export_key(name: str, fmt: str, dtype: str, runtime_device: str, replay: bool = False,
               custom_ops: str = "auto") -> ExportKey:
    """The file a runtime on `runtime_device` runs (`replay`: its verification twin)."""
    return ExportKey(name, fmt, dtype, export_device(fmt, dtype, runtime_device), replay, custom_ops)


class Exports:
    """Each ExportKey exported once, into a temporary folder. `prepare` exports many at once in worker processes
    (an export is mostly single-threaded Python: 1 to 1.5 minutes for `large` on one core, and verification
    needs eight of them); `get` exports what is missing."""

    def __init__(self, folder: Path, results: Results):
        self.folder = folder
        self.results = results
        self.paths: dict[ExportKey, Path] = {}
        self.failures: dict[ExportKey, str] = {}

    def path_for(self, key: ExportKey) -> Path:
        lowering = "" if key.custom_ops == "auto" else f"-{key.custom_ops}"
        return self.folder / (f"{key.name}-{key.dtype}-{key.device}{lowering}{'-twin' if key.replay else ''}"
                              f"{SUFFIXES[key.fmt]}")

    def record(self, key: ExportKey, seconds: float) -> None:
        path = self.path_for(key)
        lowering = "" if key.custom_ops == "auto" else f" custom_ops={key.custom_ops}"
        self.results.exports.append({"model": key.name, "format": key.fmt + ("-twin" if key.replay else "") + lowering,
                                     "dtype": key.dtype, "device": key.device, "seconds": round(seconds, 1),
                                     "megabytes": round(graph_bytes(path) / 1e6, 1)})
        self.paths[key] = path

    def prepare(self, jobs: list[tuple[ExportKey, int]]) -> None:
        """Export every (key, max_length) not exported yet, in parallel where the machine has the cores."""
        import concurrent.futures
        import multiprocessing

        missing = [(key, max_length) for key, max_length in dict(jobs).items() if key not in self.paths]
        # The largest model's first (MODEL_NAMES grow): its long exports then start at once, not after short ones.
        missing.sort(key=lambda job: MODEL_NAMES.index(job[0].name), reverse=True)
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

    def get(self, key: ExportKey, model, spec) -> Path:
        """The file of `key` (`model` and `spec` are what it is exported from), exported on first use."""
        if key in self.failures:
            raise RuntimeError(f"export of {self.path_for(key).name} failed earlier: {self.failures[key]}")
        if key not in self.paths:
            log(f"exporting {self.path_for(key).name} ...")
            start = time.perf_counter()
            export_file(model, spec, key, self.path_for(key))
            self.record(key, time.perf_counter() - start)
        return self.paths[key]


def export_file(model, spec, key: ExportKey, path: Path) -> None:
    from exporters.aoti import export_aoti
    from exporters.onnx import export_onnx
    from exporters.torchscript import export_torchscript

    if key.fmt == "onnx":
        from exporters.ops import MODE_MIN_OPSET
        from exporters.choices import DEFAULT_OPSET

        export_onnx(model, spec, path, opset=MODE_MIN_OPSET.get(key.custom_ops, DEFAULT_OPSET), dtype=key.dtype,
                    device=key.device, replay=key.replay, custom_ops=key.custom_ops)
    elif key.fmt == "aoti":
        # Compiled for the machine that runs it (and torch 2.11 has no portable target: exporters.aoti.cpu_march).
        export_aoti(model, spec, str(path), dtype=key.dtype, device=key.device, replay=key.replay, native_isa=True)
    else:
        export_torchscript(model, spec, path, dtype=key.dtype, device=key.device, replay=key.replay)


def export_in_worker(key: ExportKey, max_length: int, path: str) -> float:
    """In a worker process: the same model as the parent's (same seed), exported to path; its seconds."""
    import torch

    torch.set_num_threads(2)
    model, spec = build_model(key.name, max_length)
    start = time.perf_counter()
    export_file(model, spec, key, Path(path))
    return time.perf_counter() - start


def graph_bytes(path: Path) -> int:
    """The file and its external-data file, if any."""
    return sum(candidate.stat().st_size for candidate in (path, path.with_name(path.name + ".data"))
               if candidate.exists())
