"""The benchmark step: forward only, batch 1, random token ids, nothing masked; our eager PyTorch, ONNX Runtime
(on CUDA three times: the default graph, and as "onnxruntime-fused" and "onnxruntime-attention" the graphs
with fused attention, plan.FUSED_ONNX_RUNTIMES), TorchScript, the AOTInductor package ("aoti": with CUDA, or
--aoti) and transformers' Reformer (the reference, same weights and config) on the same device and precision,
each first compared with eager at the timed shape, then all timed taking turns (`timing.time_interleaved`)."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from benchmarks.gpu_checks.exports import ExportKey, Exports, export_key
from benchmarks.gpu_checks.plan import Plan
from benchmarks.gpu_checks.runners import open_graph, open_onnx, reference_runner, tf32_matmuls
from benchmarks.gpu_checks.steps import log, run_step, skipped_for_time
from benchmarks.gpu_checks.timing import (
    free_device_bytes,
    peak_allocation_since,
    start_peak_allocation,
    time_interleaved,
)
from benchmarks.models import reference_model

if TYPE_CHECKING:
    from benchmarks.gpu_checks.report import Results


def benchmark_inputs(length: int, vocab_size: int, seed: int = 0):
    """Batch 1, random ids in 1 .. vocab - 1 (id 0 is padding), nothing masked."""
    import torch

    generator = torch.Generator().manual_seed(seed + length)
    input_ids = torch.randint(1, vocab_size, (1, length), generator=generator)
    return input_ids, torch.ones_like(input_ids)


def benchmark_graphs(name: str, mode: str, plan: Plan) -> dict[str, ExportKey]:
    """The exported graph of each runtime that runs one, by runtime, for a precision mode: TorchScript's and
    those of the plan's ONNX Runtime rows (Plan.onnx_runtimes)."""
    dtype = "fp16" if mode == "fp16" else "fp32"
    graphs = {"torchscript": export_key(name, "torchscript", dtype, plan.device)}
    if plan.aoti:
        graphs["aoti"] = export_key(name, "aoti", dtype, plan.device)
    for runtime, custom_ops in plan.onnx_runtimes().items():
        graphs[runtime] = export_key(name, "onnx", dtype, plan.device, custom_ops=custom_ops)
    return graphs


def benchmark_exports(plan: Plan) -> list[tuple[ExportKey, int]]:
    """(key, max length) of every graph the benchmarks of the plan's models need."""
    return [(key, plan.max_length(name)) for name in plan.models if plan.lengths.get(name)
            for mode in plan.modes for key in benchmark_graphs(name, mode, plan).values()]


def benchmark_model(name: str, model, spec, plan: Plan, exports: Exports, results: Results) -> None:
    if not plan.lengths.get(name):
        results.notes.append(f"{name}: no benchmark lengths in this plan")
        return
    for mode in plan.modes:
        run_step(results, f"benchmark {name} {mode}", lambda mode=mode: benchmark_mode(
            name, model, spec, mode, plan, exports, results), plan)


def benchmark_mode(name, model, spec, mode: str, plan: Plan, exports: Exports, results: Results) -> None:
    """Every runtime at every length of the plan, in one precision mode."""
    import dataclasses
    import gc

    import torch

    from exporters.precision import model_as
    from exporters.runners import module_runner

    device, dtype, tf32 = plan.device, "fp16" if mode == "fp16" else "fp32", mode == "tf32"
    eager_model = model_as(model, dtype, device)
    runners = {"eager": module_runner(spec.wrap(eager_model, with_buckets=True), device, tf32)}
    graphs = benchmark_graphs(name, mode, plan)

    def open_runtime(runtime: str, open_runner) -> None:
        try:
            runners[runtime] = open_runner()
        except ImportError as error:  # transformers missing: its reference rows are information, not a failure
            results.notes.append(f"benchmark {name} {mode} {runtime}: skipped, not importable ({error})")
        except Exception as error:  # one runtime that cannot run must not cost the others
            results.fail(f"benchmark {name} {mode} {runtime}", error)

    open_runtime("transformers", lambda: reference_runner(reference_model(eager_model), device, tf32))  # as eager's
    open_runtime("torchscript", lambda: open_graph("torchscript", exports.get(graphs["torchscript"], model, spec),
                                                   device, tf32))
    if plan.aoti:  # a package holds a copy of the weights of the module it was exported from: eager's
        open_runtime("aoti", lambda: dataclasses.replace(
            open_graph("aoti", exports.get(graphs["aoti"], model, spec), device, tf32),
            weight_bytes=runners["eager"].weight_bytes))
    if device == "cuda":
        warm_up_torch(runners, model.config.vocab_size, mode)
    # CUDA: each ONNX Runtime session's device memory, what the free memory dropped while it opened and while it
    # ran; counted apart, so that one session's arena is never counted as another's.
    ort_device_bytes = {}
    for runtime in plan.onnx_runtimes():
        free_before = free_device_bytes() if device == "cuda" else None
        open_runtime(runtime, lambda runtime=runtime: open_onnx(
            exports.get(graphs[runtime], model, spec), device, tf32, plan.threads))
        if runtime in runners and free_before is not None:
            ort_device_bytes[runtime] = free_before - free_device_bytes()
    for length in plan.lengths[name]:
        if skipped_for_time(results, f"benchmark {name} {mode} {length}", plan):
            continue
        inputs = [tensor.to(device) for tensor in benchmark_inputs(length, model.config.vocab_size)]
        with torch.no_grad(), tf32_matmuls(tf32):
            expected = runners["eager"].run(inputs)
            rows = {}
            for runtime, runner in runners.items():
                free_before = free_device_bytes() if runtime in ort_device_bytes else None
                rows[runtime] = untimed_row(runtime, runner, expected, spec, inputs, plan)
                if free_before is not None:  # its arena keeps the most any length so far needed
                    ort_device_bytes[runtime] += free_before - free_device_bytes()
                    rows[runtime]["ort_device_gib"] = ort_device_bytes[runtime] / 2**30
            log(f"timing {', '.join(runners)} {mode} at {length} tokens, taking turns ...")
            times = time_interleaved({runtime: runner.prepared_call(inputs) for runtime, runner in runners.items()},
                                     device, plan.warmup, plan.max_runs)
        for runtime, row in rows.items():
            row.update(median_ms=statistics.median(times[runtime]), min_ms=min(times[runtime]),
                       runs=len(times[runtime]))
            results.add_benchmark(name, length, mode, device, row)
        results.save()
    runners.clear()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def warm_up_torch(runners: dict, vocab_size: int, mode: str) -> None:
    """One short forward of each torch runner, so that the libraries they initialise lazily (cuBLAS
    workspaces, fused kernels) are not counted as ONNX Runtime's memory."""
    import torch

    inputs = [tensor.cuda() for tensor in benchmark_inputs(8, vocab_size)]
    with torch.no_grad(), tf32_matmuls(mode == "tf32"):
        for runner in runners.values():
            runner.run(inputs)


def untimed_row(runtime, runner, expected, spec, inputs, plan: Plan) -> dict:
    """A runtime's row but for its times: its providers, its free-running difference from eager at the timed
    shape (information), and, for torch runtimes on CUDA, their peak memory over one forward."""
    row = {"runtime": runtime, "providers": runner.providers}
    if runtime != "eager":
        row.update(free_running_difference(runner, expected, spec, inputs))
    if plan.device == "cuda" and runtime not in plan.onnx_runtimes():  # ORT's arenas: from the device's free memory
        allocated_before = start_peak_allocation()
        runner.prepared_call(inputs)()
        # Its own weights plus the most its run held on top of everything resident before it.
        row["peak_gib"] = (peak_allocation_since(allocated_before) + runner.weight_bytes) / 2**30
    return row


def free_running_difference(runner, expected, spec, inputs) -> dict:
    """Max abs difference from eager's outputs (CPU tensors) and bucket flips, everything on the CPU."""
    from exporters.comparison import count_bucket_flips, output_error
    from exporters.verification_report import VerificationRow

    input_ids, attention_mask = inputs
    keep = attention_mask.bool().cpu()
    actual = runner.run(inputs)
    outputs = len(spec.output_names)
    max_abs, _ = output_error(spec, expected[:outputs], actual[:outputs], keep)
    flips = VerificationRow("", "", tuple(input_ids.shape), "")
    if len(actual) > outputs:  # a graph exported with bucket outputs
        count_bucket_flips(flips, expected[outputs:], actual[outputs:], keep)
    return {"max_abs": max_abs, "flips": flips.flips}
