"""The one library call behind `reformer-export`: resolve the model, export it, verify it, and put the file at
the output path only when it is whole (and verified, unless asked to keep a failed one).

The exporter writes into a staging folder beside the output path, so the file and any external-data files
it references are renamed into place together, after verification; an error or an interrupt at any step
leaves nothing at the output path."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator

from reformer.files import publish, staging_folder, write_json_atomically

from .errors import ExportError, VerificationError
from .ops import CUSTOM_OPS_MODES
from .precision import DEVICES, DTYPES, check_device
from .runtimes import require_runtime
from .specs import DEFAULT_OPSET, resolve_max_length

# Each format's file suffix; triton writes a model repository, a directory (exporters/triton/layout.py).
FORMATS = {"onnx": ".onnx", "aoti": ".pt2", "torchscript": ".pt", "triton": ""}
# Not an exporters.specs task: a directory of two graphs for generation with a cache (exporters/decoder.py).
GENERATION_TASK = "causal-lm-with-past"
# In the staging folder: the verification twin (exporters.specs.ExportWrapper), which is never shipped.
TWIN_FOLDER = "verification-twin"
DEFAULT_CUSTOM_OPS = "auto"
# What a report records the versions of; ONNX Runtime comes as either package (both provide `onnxruntime`).
REPORTED_DISTRIBUTIONS = ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "onnxruntime-gpu")


class ExportRequestError(ExportError):
    """A request that cannot be carried out as given (bad option, unusable device or output path)."""


@dataclass
class ExportRequest:
    """What to export and how. Field meanings follow the CLI options of the same names."""

    format: str  # "onnx", "aoti", "torchscript" or "triton"
    model: str | None = None  # checkpoint directory or built-in model name (None: exporters.models.DEFAULT_MODEL)
    task: str | None = None  # None: the checkpoint's own task (exporters.models.default_task)
    output: str | None = None  # None: <model name>-<task>.onnx / .pt2 / .pt in the current directory
    opset: int | None = None  # ONNX only (None: DEFAULT_OPSET)
    dtype: str = "fp32"
    device: str = "cpu"
    max_length: int | None = None  # longest sequence the export must serve (None: max_position_embeddings)
    custom_ops: str | None = None  # ONNX only (None: DEFAULT_CUSTOM_OPS)
    atol: float | None = None  # with verify only (None: the task's tolerance for the dtype, the verifier's default)
    with_buckets: bool = False  # also output each LSH layer's buckets (for checking bucket agreement)
    verify: bool = True
    keep_failed: bool = False  # with verify only
    report: str | None = None  # path of a JSON report (None: no report)
    triton_backend: str | None = None  # format triton only (None: exporters.triton.layout.DEFAULT_TRITON_BACKEND)
    native_isa: bool = False  # aoti only: build for this machine's CPU instruction set, not the portable one
    quantize: str | None = None  # ONNX graphs only: "int8" (exporters.quantize), None for fp32


@dataclass
class ExportResult:
    request: ExportRequest
    model: str  # one line: name, origin, whether the weights are random
    task: str
    output: str | None  # where the file is; None when verification failed and it was removed
    size_bytes: int
    settings: dict  # what the export applied (applied_settings)
    notes: list[str] = field(default_factory=list)  # what the user should know about the graph (export_notes)
    seconds: dict[str, float] = field(default_factory=dict)  # load, export (aoti: and compile), verify
    verification: object | None = None  # exporters.verify.VerificationReport, None without verification

    @property
    def passed(self) -> bool:
        """False only when verification ran and failed."""
        return self.verification is None or self.verification.passed

    def to_dict(self) -> dict:
        return {
            "request": asdict(self.request),
            "model": self.model,
            "task": self.task,
            "output": self.output,
            "size_bytes": self.size_bytes,
            "settings": self.settings,
            "notes": self.notes,
            "versions": library_versions(),
            "seconds": self.seconds,
            "verified": self.verification is not None,
            "passed": self.passed,
            "verification": None if self.verification is None else self.verification.to_dict(),
        }

    def summary_table(self) -> str:
        settings = self.settings
        options = f"{settings['format']}, {settings['dtype']}, {settings['device']}"
        options += f", max length {settings['max_length']}"
        if "opset" in settings:
            options += f", opset {settings['opset']}, custom ops {settings['custom_ops']}"
        if settings["format"] == "aoti":
            options += f", CPU target {settings['cpu_march']}"
        if settings.get("quantize"):
            options += f", {settings['quantize']} (dynamic, per tensor; LSH hashing in fp32)"
        if settings.get("with_buckets"):
            options += ", with bucket outputs"
        if self.verification is None:
            verdict = "skipped (--no-verify)"
        else:
            verdict = "passed" if self.passed else "FAILED" + ("" if self.output else ": output removed")
        rows = [
            ("model", self.model),
            ("task", self.task),
            ("export", options),
            ("output", f"{self.output} ({self.size_bytes / 1e6:.2f} MB)" if self.output else "(none)"),
            ("time", ", ".join(f"{step} {seconds:.1f} s" for step, seconds in self.seconds.items())),
            ("verification", verdict),
        ] + [("note", note) for note in self.notes]
        width = max(len(label) for label, _ in rows)
        lines = [f"{label:<{width}}  {value}" for label, value in rows]
        if self.verification is not None:
            lines += ["", self.verification.summary_table()]
        return "\n".join(lines)


def run_export(request: ExportRequest, progress: Callable[[str], None] = lambda message: None) -> ExportResult:
    """Export and (by default) verify. Returns the result; `result.passed` is False when verification failed,
    in which case the output was removed unless `keep_failed`. Raises ExportError (ExportRequestError for bad
    options), reformer.CheckpointError, reformer.ConfigError or OSError, leaving nothing at the output path."""
    check_options(request)
    if request.format == "triton":
        return run_triton_export(request, progress)
    if request.task == GENERATION_TASK:
        return run_generation_export(request, progress)
    from .models import DEFAULT_MODEL, resolve_model

    timer = time.perf_counter()
    progress(f"Loading model {request.model or DEFAULT_MODEL}")
    resolved = resolve_model(request.model, request.task)
    settings = applied_settings(request, resolved.model.config)
    output = request.output or f"{resolved.name}-{resolved.spec.name}{FORMATS[request.format]}"
    seconds = {"load": time.perf_counter() - timer}
    with export_staging(output) as staging:
        staged = os.path.join(staging, os.path.basename(output))
        timer = time.perf_counter()
        progress(f"Exporting {resolved.describe()}, task {resolved.spec.name}, to {request.format}")
        steps = export(settings, resolved, staged)
        seconds.update(steps or {"export": time.perf_counter() - timer})
        size_bytes = sum(os.path.getsize(os.path.join(staging, name)) for name in os.listdir(staging))
        verification = None
        if request.verify:
            twin = None
            if resolved.model.config.attn_layers.count("lsh"):
                timer = time.perf_counter()
                progress("Exporting the verification twin (eager's LSH buckets as inputs; not shipped)")
                os.mkdir(os.path.join(staging, TWIN_FOLDER))
                twin = os.path.join(staging, TWIN_FOLDER, os.path.basename(output))
                export(settings, resolved, twin, replay=True)
                seconds["twin export"] = time.perf_counter() - timer
            timer = time.perf_counter()
            progress("Verifying against eager PyTorch")
            from .verify import default_shapes, verify_export

            shapes = default_shapes(resolved.model.config, settings["max_length"])
            quantized = "quantize" in settings
            held_out = resolved.held_out_windows(settings["max_length"]) if quantized else None
            verification = verify_export(resolved.model, resolved.spec, staged, request.format, twin_path=twin,
                                         dtype=request.dtype, device=request.device, atol=request.atol, shapes=shapes,
                                         quantized=quantized, held_out=held_out)
            verification.path = output  # where the graph goes, not the staging folder it was verified in
            seconds["verify"] = time.perf_counter() - timer
        keep = verification is None or verification.passed or request.keep_failed
        if keep:
            move_into_place(staging, output)
    result = ExportResult(request, resolved.describe(), resolved.spec.name, output if keep else None, size_bytes,
                          settings, export_notes(resolved.model.config), seconds, verification)
    write_report(request, result)
    return result


def run_generation_export(request: ExportRequest, progress: Callable[[str], None]) -> ExportResult:
    """Task causal-lm-with-past: a directory of prefill and decoder-step graphs (exporters/decoder.py), staged,
    verified by exporters.verify.verify_decoder and renamed into place when verified (or with keep_failed)."""
    from .decoder import export_causal_lm_with_past
    from .models import DEFAULT_MODEL, resolve_model

    timer = time.perf_counter()
    progress(f"Loading model {request.model or DEFAULT_MODEL}")
    resolved = resolve_model(request.model, "causal-lm")
    settings = applied_settings(request, resolved.model.config)
    output = request.output or f"{resolved.name}-{GENERATION_TASK}"
    seconds = {"load": time.perf_counter() - timer}
    timer = time.perf_counter()
    progress(f"Exporting {resolved.describe()}, task {GENERATION_TASK}, to {request.format} graphs in {output}"
             + (" and verifying them" if request.verify else ""))
    format_settings = {name: settings[name] for name in ("opset", "custom_ops") if name in settings}
    if request.format == "aoti":
        format_settings["native_isa"] = request.native_isa
    if request.quantize is not None:
        format_settings["quantize"] = request.quantize
        format_settings["held_out"] = resolved.held_out_windows(settings["max_length"]) if request.verify else None
    try:
        _, verification = export_causal_lm_with_past(
            resolved.model, output, request.format, **format_settings, max_length=settings["max_length"],
            verify=request.verify, atol=request.atol, keep_failed=request.keep_failed, metadata=resolved.metadata())
    except VerificationError as error:
        verification = error.report
    seconds["export and verify" if request.verify else "export"] = time.perf_counter() - timer
    if verification is not None:
        verification.path = output  # the output as given, as for the task graphs
    kept = os.path.isdir(output) and (verification is None or verification.passed or request.keep_failed)
    size_bytes = sum(os.path.getsize(os.path.join(output, name)) for name in os.listdir(output)) if kept else 0
    result = ExportResult(request, resolved.describe(), GENERATION_TASK, output if kept else None, size_bytes,
                          settings, export_notes(resolved.model.config), seconds, verification)
    write_report(request, result)
    return result


def run_triton_export(request: ExportRequest, progress: Callable[[str], None]) -> ExportResult:
    """Format triton: the graph(s) exported and verified by run_export as for the backend's graph format, into a
    staging folder beside the repository, then the layout step (exporters.triton.layout.publish_repository)
    wraps them into the repository and renames it into place, only when they passed (or with keep_failed)."""
    from .models import DEFAULT_MODEL
    from .triton.layout import (DEFAULT_TRITON_BACKEND, GRAPH_FORMATS, publish_repository, repository_staging,
                                staged_graph_path)

    backend = request.triton_backend or DEFAULT_TRITON_BACKEND
    repository = request.output or f"{os.path.basename(os.path.normpath(request.model or DEFAULT_MODEL))}-triton"
    generation = request.task == GENERATION_TASK
    with repository_staging(repository) as staging:
        graph = staged_graph_path(staging, backend, generation)
        result = run_export(replace(request, format=GRAPH_FORMATS[backend], output=graph, triton_backend=None,
                                    report=None), progress)
        result.request = request
        result.settings = {**result.settings, "format": "triton", "triton_backend": backend}
        if result.verification is not None:
            result.verification.path = repository
        if result.output is not None:  # None: verification failed and the graph was removed
            progress(f"Writing the Triton model repository {repository} (backend {backend})")
            result.size_bytes, note = publish_repository(staging, graph, repository, backend, request.device,
                                                         generation)
            result.notes.append(note)
            result.output = repository
    write_report(request, result)
    return result


def applied_settings(request: ExportRequest, config) -> dict:
    """What the export applies, with the defaults resolved: format, dtype, device, max_length, for ONNX opset
    and custom_ops, for aoti cpu_march (exporters.aoti.CPU_TARGETS). The exporters get these values, and the
    summary and the report show them."""
    settings = {"format": request.format, "dtype": request.dtype, "device": request.device,
                "max_length": resolve_max_length(config, request.max_length)}
    if request.format == "onnx":
        settings["opset"] = DEFAULT_OPSET if request.opset is None else request.opset
        settings["custom_ops"] = request.custom_ops or DEFAULT_CUSTOM_OPS
    if request.format == "aoti":
        from .aoti import cpu_march

        settings["cpu_march"] = cpu_march(request.native_isa)
    if request.with_buckets:  # refused for causal-lm-with-past (check_options)
        settings["with_buckets"] = True
    if request.quantize:
        settings["quantize"] = request.quantize
    return settings


def export_notes(config) -> list[str]:
    """What a user should know about a graph that exported as asked."""
    if config.hash_seed is None and "lsh" in config.attn_layers:
        return [f"config.json sets no hash_seed, so the LSH rotations come from seed {config.resolved_hash_seed}; "
                "transformers draws new rotations on every call for such a config, so no graph can match it: "
                "set hash_seed in config.json to pin the rotations (the graph records the seed it used)"]
    return []


def library_versions() -> dict[str, str | None]:
    """Python's version and the installed versions of REPORTED_DISTRIBUTIONS (None: not installed)."""
    versions = {"python": platform.python_version()}
    for name in REPORTED_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_report(request: ExportRequest, result: ExportResult) -> None:
    if request.report:
        write_json_atomically(result.to_dict(), request.report)


def check_options(request: ExportRequest) -> None:
    """Checks that need no model, so a bad request fails before any slow step. An option that would not
    apply (an ONNX option for TorchScript, a verification option without verification) is refused, so that
    nothing asked for is silently dropped."""
    for name, value, choices in (("format", request.format, FORMATS), ("dtype", request.dtype, DTYPES),
                                 ("device", request.device, DEVICES)):
        if value not in choices:
            raise ExportRequestError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")
    graph_format = request.format
    if request.format == "triton":
        from .triton.layout import check_triton_options

        graph_format = check_triton_options(request.triton_backend, request.task, request.task == GENERATION_TASK)
    elif request.triton_backend is not None:
        raise ExportRequestError("--triton-backend applies to --format triton only: drop it or add --format triton")
    if request.custom_ops is not None and request.custom_ops not in CUSTOM_OPS_MODES:
        raise ExportRequestError(f"unknown custom ops {request.custom_ops!r}: "
                                 f"choose one of {', '.join(CUSTOM_OPS_MODES)}")
    if graph_format == "onnx" and request.custom_ops is not None:
        from .ops import check_mode

        try:
            check_mode(request.custom_ops, DEFAULT_OPSET if request.opset is None else request.opset)
        except ValueError as error:
            raise ExportRequestError(str(error)) from None
    if graph_format != "onnx":
        for option, value in (("--opset", request.opset), ("--custom-ops", request.custom_ops)):
            if value is not None:
                raise ExportRequestError(f"{option} applies to ONNX only: drop it for {graph_format} graphs")
    elif request.opset is not None:
        from .onnx import SUPPORTED_OPSETS

        if request.opset not in SUPPORTED_OPSETS:
            raise ExportRequestError(f"opset {request.opset} is not supported: choose {SUPPORTED_OPSETS[0]} to "
                                     f"{SUPPORTED_OPSETS[-1]}")
    if request.quantize is not None:
        check_quantize_options(request, graph_format)
    if request.format != "aoti" and request.native_isa:
        raise ExportRequestError(f"--native-isa applies to aoti only: drop it for --format {request.format}")
    if request.format == "aoti" and request.output and request.task != GENERATION_TASK:
        from .aoti import check_package_path

        try:
            check_package_path(request.output)
        except ExportError as error:
            raise ExportRequestError(str(error)) from None
    if not request.verify:
        for option, given in (("--atol", request.atol is not None), ("--keep-failed", request.keep_failed)):
            if given:
                raise ExportRequestError(f"{option} applies to verification only: drop it with --no-verify")
    if request.task == GENERATION_TASK and request.with_buckets:
        raise ExportRequestError(f"--with-buckets applies to task graphs: task {GENERATION_TASK}'s cache already "
                                 "holds the buckets")
    if request.task == GENERATION_TASK and (request.dtype, request.device) != ("fp32", "cpu"):
        raise ExportRequestError(f"task {GENERATION_TASK} exports fp32 graphs on the CPU (they run on CUDA too): "
                                 "drop --dtype and --device")
    check_device(request.device)
    require_runtime(graph_format, request.verify)
    if graph_format == "aoti":
        from .aoti import cpu_march, require_compiler

        require_compiler()
        cpu_march(request.native_isa)  # refused off x86-64 without --native-isa
    if request.dtype == "fp16" and request.device != "cuda":
        raise ExportRequestError("fp16 export is for the CUDA runtimes: use device cuda (fp32 on the CPU)")
    if request.atol is not None and not request.atol > 0:
        raise ExportRequestError(f"atol must be positive, got {request.atol}")
    for what, path in (("output", request.output), ("report", request.report)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise ExportRequestError(f"cannot write the {what} {path}: {folder} is not a directory")


def check_quantize_options(request: ExportRequest, graph_format: str) -> None:
    from .quantize import QUANTIZATIONS, onnxruntime_distribution

    if request.quantize not in QUANTIZATIONS:
        raise ExportRequestError(f"unknown quantization {request.quantize!r}: choose {', '.join(QUANTIZATIONS)}")
    if graph_format != "onnx":
        raise ExportRequestError(f"--quantize applies to ONNX graphs only: drop it for {graph_format} graphs")
    if request.device != "cpu" or request.dtype != "fp32":
        raise ExportRequestError(f"--quantize {request.quantize} makes graphs for ONNX Runtime on the CPU from fp32: "
                                 "drop --device and --dtype")
    try:
        onnxruntime_distribution()
    except ExportError as error:
        raise ExportRequestError(str(error)) from None


def export(settings: dict, resolved, path: str, replay: bool = False) -> dict[str, float]:
    """The graph `settings` describe (applied_settings), or (`replay`) its verification twin, through the
    same exporter. Returns the seconds of each step where the exporter has several (aoti: export, compile),
    else {}."""
    metadata = resolved.metadata()
    if settings["format"] == "onnx":
        from .onnx import export_onnx

        from .quantize import quantized_into

        with quantized_into(path, settings.get("quantize")) as fp32_path:
            export_onnx(resolved.model, resolved.spec, fp32_path, opset=settings["opset"],
                        custom_ops=settings["custom_ops"], dtype=settings["dtype"], device=settings["device"],
                        max_length=settings["max_length"], with_buckets=settings.get("with_buckets", False),
                        replay=replay, metadata=metadata)
    elif settings["format"] == "aoti":
        from .aoti import NATIVE_MARCH, export_aoti

        return export_aoti(resolved.model, resolved.spec, path, dtype=settings["dtype"], device=settings["device"],
                           max_length=settings["max_length"], with_buckets=settings.get("with_buckets", False),
                           replay=replay, metadata=metadata, native_isa=settings["cpu_march"] == NATIVE_MARCH)
    else:
        from .torchscript import export_torchscript

        export_torchscript(resolved.model, resolved.spec, path, dtype=settings["dtype"], device=settings["device"],
                           max_length=settings["max_length"], with_buckets=settings.get("with_buckets", False),
                           replay=replay, metadata=metadata)
    return {}


@contextmanager
def export_staging(output: str) -> Iterator[str]:
    """reformer.files.staging_folder beside a file output, with the request errors the CLI reports."""
    if os.path.isdir(output):
        raise ExportRequestError(f"output {output} is a directory: give a file path")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportRequestError(f"cannot write {output}: {folder} is not a writable folder")
    with staging_folder(output) as staging:
        yield staging


def move_into_place(staging: str, output: str) -> None:
    """Rename the staged files beside output, the main file last, so that it never refers to missing data
    (the verification twin stays behind)."""
    folder, main = os.path.dirname(os.path.abspath(output)), os.path.basename(output)
    shipped = [name for name in os.listdir(staging) if name != TWIN_FOLDER]
    for name in sorted(shipped, key=lambda name: name == main):
        publish(os.path.join(staging, name), os.path.join(folder, name))
