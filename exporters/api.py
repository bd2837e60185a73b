"""The one library call behind `reformer-export`: resolve the model, export it, verify it, and put the file at
the output path only when it is whole (and verified, unless asked to keep a failed one).

The exporter writes into a staging folder beside the output path, so the file and any external-data files
it references are renamed into place together, after verification; an error or an interrupt at any step
leaves nothing at the output path."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Iterator

from reformer.files import publish, staging_folder, write_json_atomically

from .choices import DEFAULT_MODEL, DEFAULT_TRITON_BACKEND, DEVICES, DTYPES, GENERATION_TASK, TRITON_BACKENDS
from .errors import ExportRequestError, VerificationError
from .formats import FORMATS, GRAPH_FORMATS, TRITON
from .precision import check_device
from .request import ExportRequest
from .result import ExportResult
from .specs import resolve_max_length

# In the staging folder: the verification twin (exporters.specs.ExportWrapper), which is never shipped.
TWIN_FOLDER = "verification-twin"


def run_export(request: ExportRequest, progress: Callable[[str], None] = lambda message: None) -> ExportResult:
    """Export and (by default) verify. Returns the result; `result.passed` is False when verification failed,
    in which case the output was removed unless `keep_failed`. Raises ExportError (ExportRequestError for bad
    options), reformer.CheckpointError, reformer.ConfigError or OSError, leaving nothing at the output path."""
    check_options(request)
    if request.format == TRITON.name:
        return run_triton_export(request, progress)
    if request.task == GENERATION_TASK:
        return run_generation_export(request, progress)
    from .models import resolve_model

    timer = time.perf_counter()
    progress(f"Loading model {request.model or DEFAULT_MODEL}")
    resolved = resolve_model(request.model, request.task)
    settings = applied_settings(request, resolved.model.config)
    chosen_format = GRAPH_FORMATS[request.format]
    output = request.output or f"{resolved.name}-{resolved.spec.name}{chosen_format.suffix}"
    seconds = {"load": time.perf_counter() - timer}
    with export_staging(output) as staging:
        staged = os.path.join(staging, os.path.basename(output))
        timer = time.perf_counter()
        progress(f"Exporting {resolved.describe()}, task {resolved.spec.name}, to {request.format}")
        steps = chosen_format.export(settings, resolved, staged)
        if "quantize" in settings:  # the twin, the summary and the report take the recipe the graph took
            from .quantize import quantization_of

            settings["quantize_recipe"] = quantization_of(staged)["recipe"]
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
                chosen_format.export(settings, resolved, twin, replay=True)
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
    notes = export_notes(resolved.model.config) + resolved.tokenizer.notes
    result = ExportResult(request, resolved.describe(), resolved.spec.name, output if keep else None, size_bytes,
                          settings, notes, seconds, verification)
    write_report(request, result)
    return result


def run_generation_export(request: ExportRequest, progress: Callable[[str], None]) -> ExportResult:
    """Task causal-lm-with-past: a directory of prefill and decoder-step graphs (exporters/decoder.py), staged,
    verified by exporters.verify.verify_decoder and renamed into place when verified (or with keep_failed)."""
    from .decoder import export_causal_lm_with_past
    from .models import resolve_model

    timer = time.perf_counter()
    progress(f"Loading model {request.model or DEFAULT_MODEL}")
    resolved = resolve_model(request.model, "causal-lm")
    settings = applied_settings(request, resolved.model.config)
    output = request.output or f"{resolved.name}-{GENERATION_TASK}"
    seconds = {"load": time.perf_counter() - timer}
    timer = time.perf_counter()
    progress(f"Exporting {resolved.describe()}, task {GENERATION_TASK}, to {request.format} graphs in {output}"
             + (" and verifying them" if request.verify else ""))
    held_out = resolved.held_out_windows(settings["max_length"]) if request.quantize else None
    try:
        description, verification = export_causal_lm_with_past(
            resolved.model, output, request.format, **GRAPH_FORMATS[request.format].exporter_options(settings),
            quantize=request.quantize, held_out=held_out, max_length=settings["max_length"], verify=request.verify,
            atol=request.atol, keep_failed=request.keep_failed, metadata=resolved.metadata(),
            tokenizer_files=resolved.tokenizer.files)
        if request.quantize:
            settings["quantize_recipe"] = description["quantization"]["recipe"]
    except VerificationError as error:
        verification = error.report
    seconds["export and verify" if request.verify else "export"] = time.perf_counter() - timer
    if verification is not None:
        verification.path = output  # the output as given, as for the task graphs
    kept = os.path.isdir(output) and (verification is None or verification.passed or request.keep_failed)
    size_bytes = sum(os.path.getsize(os.path.join(output, name)) for name in os.listdir(output)) if kept else 0
    notes = export_notes(resolved.model.config) + resolved.tokenizer.notes
    result = ExportResult(request, resolved.describe(), GENERATION_TASK, output if kept else None, size_bytes,
                          settings, notes, seconds, verification)
    write_report(request, result)
    return result


def run_triton_export(request: ExportRequest, progress: Callable[[str], None]) -> ExportResult:
    """Format triton: the graph(s) exported and verified by run_export as for the backend's graph format, into a
    staging folder beside the repository, then the layout step (exporters.triton.layout.publish_repository)
    wraps them into the repository and renames it into place, only when they passed (or with keep_failed)."""
    from .triton.layout import publish_repository, repository_staging, staged_graph_path

    backend = request.triton_backend or DEFAULT_TRITON_BACKEND
    model_name = os.path.basename(os.path.normpath(request.model or DEFAULT_MODEL))
    repository = request.output or f"{model_name}-{TRITON.name}"
    generation = request.task == GENERATION_TASK
    with repository_staging(repository) as staging:
        graph = staged_graph_path(staging, backend, generation)
        result = run_export(replace(request, format=TRITON_BACKENDS[backend], output=graph, triton_backend=None,
                                    report=None), progress)
        result.request = request
        result.settings = {**result.settings, "format": TRITON.name, "triton_backend": backend}
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
    """What the export applies, with the defaults resolved: format, dtype, device, max_length, then the
    format's own (exporters.formats: for ONNX opset and custom_ops, for aoti cpu_march). The exporters get these
    values, and the summary and the report show them."""
    settings = {"format": request.format, "dtype": request.dtype, "device": request.device,
                "max_length": resolve_max_length(config, request.max_length)}
    settings.update(GRAPH_FORMATS[request.format].settings(request))
    if request.with_buckets:  # refused for causal-lm-with-past (check_options)
        settings["with_buckets"] = True
    if request.quantize:
        settings["quantize"] = request.quantize
    return settings


def export_notes(config) -> list[str]:
    """What a user should know about a graph that exported as asked (the caller adds the tokenizer's notes,
    exporters.tokenizer_files)."""
    notes = []
    if config.hash_seed is None and "lsh" in config.attn_layers:
        notes.append(f"config.json sets no hash_seed, so the LSH rotations come from seed {config.resolved_hash_seed}; "
                     "transformers draws new rotations on every call for such a config, so no graph can match it: "
                     "set hash_seed in config.json to pin the rotations (the graph records the seed it used)")
    if config.num_buckets_defaulted:
        notes.append(f"config.json sets no num_buckets, so the graph takes num_buckets {config.num_buckets}, "
                     f"resolved from max_position_embeddings {config.max_position_embeddings}; transformers "
                     "instead picks num_buckets from the first sequence length a model runs and keeps it, so a "
                     "transformers model first run on a shorter input can hash into fewer buckets and give other "
                     f"outputs: set num_buckets to {config.num_buckets} in config.json to pin it")
    return notes


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
    graph_format = FORMATS[request.format].graph_format(request)
    for entry in (TRITON, *GRAPH_FORMATS.values()):  # the layout first: its option decides the graph format
        entry.check(request, graph_format)
    check_verification_options(request)
    check_generation_options(request)
    check_device(request.device)
    GRAPH_FORMATS[graph_format].require(request)
    if request.dtype == "fp16" and request.device != "cuda":
        raise ExportRequestError("fp16 export is for the CUDA runtimes: use device cuda (fp32 on the CPU)")
    if request.atol is not None and not request.atol > 0:
        raise ExportRequestError(f"atol must be positive, got {request.atol}")
    check_paths(request)


def check_verification_options(request: ExportRequest) -> None:
    if not request.verify:
        for option, given in (("--atol", request.atol is not None), ("--keep-failed", request.keep_failed)):
            if given:
                raise ExportRequestError(f"{option} applies to verification only: drop it with --no-verify")


def check_generation_options(request: ExportRequest) -> None:
    if request.task == GENERATION_TASK and request.with_buckets:
        raise ExportRequestError(f"--with-buckets applies to task graphs: task {GENERATION_TASK}'s cache already "
                                 "holds the buckets")
    if request.task == GENERATION_TASK and (request.dtype, request.device) != ("fp32", "cpu"):
        raise ExportRequestError(f"task {GENERATION_TASK} exports fp32 graphs on the CPU (they run on CUDA too): "
                                 "drop --dtype and --device")


def check_paths(request: ExportRequest) -> None:
    """A path that is a symbolic link is refused: renaming the export into place would replace the link, not
    write where it points, and writing through it would put files outside the path given."""
    for what, path in (("output", request.output), ("report", request.report)):
        if path and os.path.islink(path):
            raise ExportRequestError(f"the {what} {path} is a symbolic link (to {os.readlink(path)}): give the path "
                                     "itself, or remove the link")
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise ExportRequestError(f"cannot write the {what} {path}: {folder} is not a directory")


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
