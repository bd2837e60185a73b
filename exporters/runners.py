"""An exported graph loaded as a `Runner`, per runtime: ONNX Runtime (CPU, CUDA), AOTInductor packages and
TorchScript modules (libtorch, CPU and CUDA); exporters.formats says which opens a format's files. A runtime
that is not present here is not an error: the openers say why it cannot run, and the verifier reports it as
skipped."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import ExportError, first_line

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
    onnxruntime-gpu lists CUDA on machines without a GPU; `open_onnxruntime` checks the session's providers."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def open_torchscript(path: str, device: str, tf32: bool = False) -> tuple[Runner | None, str]:
    if device == "cuda" and not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    from .torchscript import legacy_jit

    try:
        with legacy_jit():
            module = torch.jit.load(path, map_location=device)
    except Exception as error:  # a file torch cannot load is a failed verification, not a crash
        raise ExportError(f"cannot load TorchScript file {path}: {first_line(error)}") from None
    return module_runner(module, device, tf32), ""


def open_aoti(path: str, device: str, tf32: bool = False) -> tuple[Runner | None, str]:
    """An AOTInductor package runs on the device it was compiled for only (exporters/aoti.py)."""
    if device == "cuda" and not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    from .aoti import load_package, package_metadata

    compiled_for = package_metadata(path)["AOTI_DEVICE_KEY"]
    if compiled_for != device:
        return None, f"the package is compiled for {compiled_for}"
    try:
        package = load_package(path)
    except Exception as error:  # a package torch cannot load is a failed verification, not a crash
        raise ExportError(f"cannot load AOTInductor package {path}: {first_line(error)}") from None
    return module_runner(package, device, tf32), ""


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


def open_onnxruntime(path: str, device: str, tf32: bool = False) -> tuple[Runner | None, str]:
    from reformer.runtime import CPU, CUDA, open_session, shrink_arena_run_options

    provider = {"cpu": CPU, "cuda": CUDA}[device]
    if provider not in onnxruntime_providers():
        return None, f"onnxruntime lists no {provider}"
    try:
        # Quiet: a CUDA provider that cannot load is reported in `skipped`, not logged. TF32 as eager's run
        # (open_session's CUDA options: strict fp32 unless tf32).
        session = open_session(path, [provider], quiet=True, tf32=tf32)
    except Exception as error:
        if device == "cuda":  # the provider is listed but cannot start (no GPU, missing CUDA libraries)
            return None, f"{provider} failed to start: {first_line(error)}"
        raise ExportError(f"ONNX Runtime cannot load {path}: {first_line(error)}") from None
    if provider not in session.get_providers():
        return None, f"{provider} is listed but the session fell back to {session.get_providers()}"
    input_names = [graph_input.name for graph_input in session.get_inputs()]
    # Verification keeps a graph's and its twin's sessions open together: their arenas shrink after each run
    # (a long input's CUDA arena is tens of GiB).
    run_options = shrink_arena_run_options(session)

    def run(inputs):
        feeds = {name: tensor.cpu().numpy() for name, tensor in zip(input_names, inputs)}
        return [torch.from_numpy(output) for output in session.run(None, feeds, run_options)]

    return Runner(run, device, [output.name for output in session.get_outputs()]), ""


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
