"""An exported graph loaded as a `Runner`, the one type the verifier, the generation checks, the benchmarks and
the tests run graphs through. Each format's module opens its files as one (`open_runner` in exporters/onnx.py,
aoti.py, torchscript.py; exporters.formats dispatches): a runtime that is not present here is not an error, the
opener says why it cannot run, and the verifier reports it as skipped. Eager modules and other torch callables
run as one too (`module_runner`, `callable_runner`), so that a benchmark times every runtime alike."""

from __future__ import annotations

import contextlib
from dataclasses import KW_ONLY, dataclass, field
from typing import Callable

import torch


@dataclass
class Runner:
    """A loaded graph: `run(tensors)` takes the graph's inputs in order (CPU tensors; a twin's forced buckets
    after input_ids and attention_mask) and returns its outputs as CPU tensors. `prepared_call(tensors)`: the
    same inputs already on the device give a call that runs the graph once on them, inputs and outputs staying
    on the device, under the caller's grad mode and matmul precision (what benchmarks time). `output_names`:
    what the file calls its outputs (None where the format names none); `providers`: the ONNX Runtime
    session's execution providers in use (none for torch runtimes); `weight_bytes`: the weights a torch
    runtime holds on its device, which its CUDA peak memory counts (None where torch cannot see them: an
    AOTInductor package's)."""

    run: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    device: str
    output_names: list[str] | None = None
    _: KW_ONLY
    prepared_call: Callable[[list[torch.Tensor]], Callable[[], object]]
    providers: list[str] = field(default_factory=list)
    weight_bytes: int | None = None


def onnxruntime_providers() -> list[str]:
    """Execution providers this onnxruntime build lists (none without onnxruntime). Listing is not running:
    onnxruntime-gpu lists CUDA on machines without a GPU; exporters.onnx.open_runner checks the session's providers."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def module_runner(module, device: str, tf32: bool) -> Runner:
    """A Runner over a task graph loaded as a TorchScript module or AOTInductor package, or over eager's export
    wrapper (exporters.specs.ExportWrapper), whose calling convention they share. Its weight bytes are those
    of the module's parameters and buffers (a package has none that torch sees)."""

    def call(*inputs):
        # A twin takes its forced buckets as one tuple argument (exporters.specs.ExportWrapper).
        return module(*inputs[:2], tuple(inputs[2:])) if len(inputs) > 2 else module(*inputs)

    # A TorchScript module is a torch.nn.Module; an AOTInductor package is not.
    weight_bytes = module_weight_bytes(module) if isinstance(module, torch.nn.Module) else None
    return callable_runner(call, device, tf32, weight_bytes)


def callable_runner(call: Callable, device: str, tf32: bool = False, weight_bytes: int | None = None) -> Runner:
    """A Runner over a loaded torch callable that takes the inputs in order (a TorchScript method, an
    AOTInductor model, an eager forward) and returns a tensor or a sequence of them."""

    def run(inputs):
        inputs = [tensor.to(device) for tensor in inputs]
        with torch.no_grad(), tf32_matmuls(tf32):
            outputs = call(*inputs)
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        return [tensor.cpu() for tensor in outputs]

    def prepared_call(inputs):
        return lambda: call(*inputs)

    return Runner(run, device, prepared_call=prepared_call, weight_bytes=weight_bytes)


def module_weight_bytes(module: torch.nn.Module) -> int:
    """The bytes of a module's parameters and buffers."""
    return sum(tensor.numel() * tensor.element_size() for tensor in (*module.parameters(), *module.buffers()))


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
