"""An exported graph loaded as a `Runner`, the one type the verifier, the generation checks and the tests run
graphs through. Each format's module opens its files as one (`open_runner` in exporters/onnx.py, aoti.py,
torchscript.py; exporters.formats dispatches): a runtime that is not present here is not an error, the opener
says why it cannot run, and the verifier reports it as skipped."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Runner:
    """A loaded graph: `run(tensors)` takes the graph's inputs in order (CPU tensors; a twin's forced buckets
    after input_ids and attention_mask) and returns its outputs as CPU tensors. `output_names`: what the
    file calls its outputs (None where the format names none)."""

    run: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    device: str
    output_names: list[str] | None = None


def onnxruntime_providers() -> list[str]:
    """Execution providers this onnxruntime build lists (none without onnxruntime). Listing is not running:
    onnxruntime-gpu lists CUDA on machines without a GPU; exporters.onnx.open_runner checks the session's providers."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def module_runner(module, device: str, tf32: bool) -> Runner:
    """A Runner over a task graph loaded as a TorchScript module or AOTInductor package (same calling
    convention)."""

    def call(*inputs):
        # A twin takes its forced buckets as one tuple argument (exporters.specs.ExportWrapper).
        return module(*inputs[:2], tuple(inputs[2:])) if len(inputs) > 2 else module(*inputs)

    return callable_runner(call, device, tf32)


def callable_runner(call: Callable, device: str, tf32: bool = False) -> Runner:
    """A Runner over a loaded torch callable that takes the inputs in order (a TorchScript method, an
    AOTInductor model) and returns a tensor or a sequence of them."""

    def run(inputs):
        inputs = [tensor.to(device) for tensor in inputs]
        with torch.no_grad(), tf32_matmuls(tf32):
            outputs = call(*inputs)
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        return [tensor.cpu() for tensor in outputs]

    return Runner(run, device)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """Eager's, TorchScript's and AOTInductor packages' (ATen) CUDA matmuls in TF32 (enabled) or strict fp32, to
    compare like with like; restores the previous setting."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
