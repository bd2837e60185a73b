"""The verification step: every graph and its twin checked with `exporters.verify.verify_export` (bucket
replay and near-tie certificates) on each runtime the machine has."""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.gpu_checks.exports import ExportKey, Exports, export_device, export_key
from benchmarks.gpu_checks.plan import FUSED_ONNX_RUNTIMES, VERIFIED_MODELS, Plan
from benchmarks.gpu_checks.steps import log, run_step

if TYPE_CHECKING:
    from benchmarks.gpu_checks.report import Results

CPU_VERIFY_MAX_LENGTH = 4096


def verification_cases(cuda: bool, aoti: bool) -> list[tuple[str, str, str]]:
    """(format, dtype, runtime) to verify. fp32 ONNX is one file for both execution providers; TorchScript
    runs where it was traced; fp16 is for CUDA only. AOTInductor packages (`aoti`) run where they were
    compiled: on CUDA in fp16 only (each package is a compile, and the run has 8 minutes; the benchmark
    compares the fp32 package with eager free-running), otherwise in fp32 on the CPU."""
    cases = [("onnx", "fp32", "onnxruntime-cpu"), ("torchscript", "fp32", "torchscript-cpu")]
    if cuda:
        cases += [("onnx", "fp32", "onnxruntime-cuda"), ("torchscript", "fp32", "torchscript-cuda"),
                  ("onnx", "fp16", "onnxruntime-cuda"), ("torchscript", "fp16", "torchscript-cuda")]
    if aoti:
        cases.append(("aoti", "fp16", "aoti-cuda") if cuda else ("aoti", "fp32", "aoti-cpu"))
    return cases


def verification_shapes(config, device: str):
    """The verifier's default shapes, up to CPU_VERIFY_MAX_LENGTH on the CPU (the CPU machine's own run
    covers that; 2 x 65,536 would take minutes there); the longest at batch 1 (2 x 65,536 of `large` in fp32
    would need ~100 GiB of ONNX Runtime arena)."""
    from exporters.verify import default_shapes

    max_length = config.max_position_embeddings
    max_length = min(max_length, CPU_VERIFY_MAX_LENGTH) if device == "cpu" else max_length
    return [(1 if length == max_length else batch, length) for batch, length in default_shapes(config, max_length)]


def verification_plan(name: str, plan: Plan) -> list[tuple[str, str, str, bool, str]]:
    """(format, dtype, runtime, tf32, custom_ops) to verify for a model. With CUDA also the benchmark's graphs
    with fused attention (FUSED_ONNX_RUNTIMES) in fp16 on ONNX Runtime CUDA, where its memory-efficient kernel
    runs them (the tests verify both lowerings in fp32 on ONNX Runtime CPU; in fp32 and TF32 on CUDA the
    benchmark compares them with eager free-running); fp16 only, to keep the run within its 8 minutes."""
    cases = [(fmt, dtype, runtime, False, "auto")
             for fmt, dtype, runtime in verification_cases(plan.device == "cuda", plan.aoti)]
    if plan.device == "cuda":
        cases.append(("onnx", "fp32", "onnxruntime-cuda", True, "auto"))
        cases += [("onnx", "fp16", "onnxruntime-cuda", False, custom_ops)
                  for custom_ops in FUSED_ONNX_RUNTIMES.values()]
    # `large` on the CPU runtimes would take minutes per row at 65,536 tokens; the CPU runs verify enwik8.
    return [case for case in cases if name != "large" or case[2].endswith("cuda")]


def verification_exports(plan: Plan) -> list[tuple[ExportKey, int]]:
    """(key, max length) of every graph and twin the verification of the plan's models needs."""
    return [(export_key(name, fmt, dtype, runtime.split("-")[1], replay, custom_ops), plan.max_length(name))
            for name in plan.models if name in VERIFIED_MODELS
            for fmt, dtype, runtime, _, custom_ops in verification_plan(name, plan) for replay in (False, True)]


def verify_model(name: str, model, spec, plan: Plan, exports: Exports, results: Results) -> None:
    from exporters.verify import verify_export

    if plan.device != "cuda":
        results.notes.append(f"{name}: CUDA runtimes, TF32 and fp16 not verified (torch sees no CUDA device)")
    for fmt, dtype, runtime, tf32, custom_ops in verification_plan(name, plan):
        runtime_device = runtime.split("-")[1]
        device = export_device(fmt, dtype, runtime_device)
        precision = "tf32" if tf32 else dtype
        lowering = "" if custom_ops == "auto" else f" custom_ops={custom_ops}"

        def verify(fmt=fmt, dtype=dtype, runtime=runtime, runtime_device=runtime_device, device=device, tf32=tf32,
                   precision=precision, custom_ops=custom_ops, lowering=lowering):
            path = exports.get(export_key(name, fmt, dtype, runtime_device, custom_ops=custom_ops), model, spec)
            twin = exports.get(export_key(name, fmt, dtype, runtime_device, replay=True, custom_ops=custom_ops),
                               model, spec)
            log(f"verifying {name} {fmt} {precision}{lowering} on {runtime} ...")
            report = verify_export(model, spec, path, fmt, twin_path=twin, dtype=dtype, device=device, tf32=tf32,
                                   runtimes=[runtime], shapes=verification_shapes(model.config, runtime_device))
            results.add_verification(name, precision, report, custom_ops)

        run_step(results, f"verify {name} {fmt} {precision}{lowering} {runtime}", verify, plan)
