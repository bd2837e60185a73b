"""The runtimes a benchmark times, each an exporters.runners.Runner: exported graphs open through their format's
entry (exporters.formats.GRAPH_FORMATS), transformers' Reformer is wrapped as one (eager's export wrapper is
exporters.runners.module_runner's). Torch is imported when first used, so that bad options fail before it
loads."""

from __future__ import annotations

from pathlib import Path

from benchmarks.gpu_checks.steps import RuntimeUnavailable, log
from exporters.formats import GRAPH_FORMATS


def open_graph(fmt: str, path, device: str, tf32: bool = False, **options):
    """The exported graph at path as a Runner on `device`, its format's `options` given (onnx: open_onnx's);
    RuntimeUnavailable where its runtime cannot run it here, an ONNX Runtime session on CUDA that fell back
    to the CPU among them (ONNX Runtime falls back silently)."""
    runner, why_not = GRAPH_FORMATS[fmt].open_runner(str(path), device, tf32, **options)
    if runner is None:
        raise RuntimeUnavailable(f"{fmt} cannot run {Path(path).name} on {device}: {why_not}")
    return runner


def open_onnx(path, device: str, tf32: bool = False, threads: int | None = None):
    """An ONNX Runtime session as open_graph's Runner, with intra-op `threads`; its arenas keep what its runs
    grew them to, as the CUDA benchmark reads them off the device's free memory."""
    runner = open_graph("onnx", path, device, tf32, threads=threads, keep_arena=True)
    log(f"onnxruntime session {Path(path).name} ({'tf32' if tf32 else 'strict fp32'} on {device}): "
        f"{runner.providers}")
    return runner


def reference_runner(reference, device: str, tf32: bool = False):
    """transformers' ReformerModelWithLMHead (benchmarks.models.reference_model) as a Runner, forward only: no
    cache, and its logits, which is what our causal-lm graphs return."""
    from exporters.runners import callable_runner, module_weight_bytes

    def forward(input_ids, attention_mask):
        return reference(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return callable_runner(forward, device, tf32, module_weight_bytes(reference))


def tf32_matmuls(enabled: bool):
    """exporters.runners.tf32_matmuls, imported when first used (exporters load torch)."""
    from exporters.runners import tf32_matmuls as switch

    return switch(enabled)
