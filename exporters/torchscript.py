"""TorchScript export for C++ hosts: one `torch.jit.trace` of the task's export wrapper that serves every batch
size and every length up to the model's maximum.

Legacy: torch deprecates TorchScript in favour of torch.export; its successor for libtorch hosts is the
AOTInductor package (exporters/aoti.py, `--format aoti`). This format stays for hosts built on torch::jit::load.

The model has no Python branching on shapes or values in inference `forward` (reformer/ keeps chunk shapes
static and makes every data-dependent choice a tensor operation), so a trace at one representative shape
records the general path: padding to the chunk multiple, several chunks, and the "fits one chunk" switch as a
tensor. The graph holds only ATen ops, which libtorch runs without Python."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import warnings

import torch
from torch import nn

from reformer.files import atomic_write
from reformer.sampling import DECODER_CONFIG_NAME

from .decoder_graphs import DecoderGraphs
from .errors import ExportError, first_line
from .precision import model_as
from .runners import module_runner
from .specs import TaskSpec, embedded_description, resolve_max_length, wrapper_example_inputs

METADATA_NAME = "reformer_export.json"
# Node kinds a libtorch host runs without Python: ATen operators and TorchScript's own primitives, except
# the primitive that calls back into Python (what an autograd Function or a Python op becomes).
HOST_OP_NAMESPACES = ("aten::", "prim::")
PYTHON_OP = "prim::PythonOp"
# torch 2.13 warns on every torch.jit trace, save and load ("`torch.jit.trace` is deprecated. Please switch to
# `torch.compile` or `torch.export`."). The project ships TorchScript on purpose, as the legacy format, so that
# warning tells a user of reformer-export nothing: legacy_jit silences exactly it around our own calls.
JIT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


@contextlib.contextmanager
def legacy_jit():
    """torch.jit calls without torch's TorchScript deprecation warning (JIT_DEPRECATION); other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_DEPRECATION, category=DeprecationWarning)
        yield


def export_torchscript(
    model: nn.Module,
    spec: TaskSpec,
    path: str,
    *,
    dtype: str = "fp32",
    device: str = "cpu",
    with_buckets: bool = False,
    replay: bool = False,
    max_length: int | None = None,
    metadata: dict | None = None,
) -> None:
    """Trace `spec.wrap(model, with_buckets)` and save it atomically to path, with a JSON description of the
    graph (task, input and output names, hash seed, maximum length, ...) as the extra file METADATA_NAME.

    forward(input_ids, attention_mask), both int64 B, L, returns the spec's outputs in the ONNX output order,
    then, with `with_buckets`, the B, H, N, L int64 buckets of each LSH layer. `replay` traces the
    verification twin instead (exporters.specs.ExportWrapper: forward(input_ids, attention_mask,
    forced_buckets), bucket outputs always). The caller's model is not changed (exporters.precision.model_as copies it when dtype or device differ from its own)."""
    config = model.config
    max_length = resolve_max_length(config, max_length)
    wrapper = spec.wrap(model_as(model, dtype, device), with_buckets, replay).eval()
    example = wrapper_example_inputs(wrapper, config, max_length, device)
    with torch.no_grad(), legacy_jit(), warnings.catch_warnings():
        # The tracer warns about the model's input checks (shape comparisons that become constants); the
        # values flow through tensors, which the tests check at shapes other than the traced one.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            traced = torch.jit.trace(wrapper, example, check_trace=False)
        except RuntimeError as error:
            raise ExportError(f"TorchScript trace failed: {first_line(error)}") from error
    foreign = sorted(set(non_host_ops(traced)))
    if foreign:
        raise ExportError(f"the traced graph holds ops a C++ host cannot run without Python: {', '.join(foreign)}")
    description = embedded_description(config, spec, wrapper, "torchscript", max_length=max_length, dtype=dtype,
                                       device=device)
    description.update(trace_shape=list(example[0].shape), **(metadata or {}))
    extra_files = {METADATA_NAME: json.dumps(description, indent=2, sort_keys=True)}
    atomic_write(path, lambda temporary: save_module(traced, temporary, extra_files))


def save_module(module: torch.jit.ScriptModule, path: str, extra_files: dict[str, str]) -> None:
    """torch.jit.save through a Python file, whose failed writes raise OSError: given a path, torch writes
    in C++ and a full disk aborts the whole process (its zip writer throws from a destructor)."""
    with legacy_jit(), open(path, "wb") as handle:
        torch.jit.save(module, handle, _extra_files=extra_files)


def load_metadata(path: str) -> dict:
    """The JSON description export_torchscript embedded in the file at path."""
    extra_files = {METADATA_NAME: ""}
    with legacy_jit():
        torch.jit.load(path, map_location="cpu", _extra_files=extra_files)
    return json.loads(extra_files[METADATA_NAME])


def module_node_kinds(module: torch.jit.ScriptModule) -> list[str]:
    """The kind of every node of the module's inlined graph, nested blocks included."""
    kinds = []

    def visit(block) -> None:
        for node in block.nodes():
            kinds.append(node.kind())
            for inner in node.blocks():
                visit(inner)

    visit(module.inlined_graph)
    return kinds


def non_host_ops(module: torch.jit.ScriptModule) -> list[str]:
    """Kinds of the nodes (nested blocks included) that a libtorch host cannot run without Python."""
    return [kind for kind in module_node_kinds(module) if not kind.startswith(HOST_OP_NAMESPACES) or kind == PYTHON_OP]


def export_decoder(decoder, specs: dict, folder: str, description: dict) -> None:
    """The prefill (`forward`) and step (`step`) of causal-lm-with-past (exporters.decoder_graphs) as one module
    (description["files"]["module"]), traced at their specs' example inputs, decoder_config.json's content as an
    extra file."""
    module = DecoderGraphs(decoder).eval()
    with legacy_jit():
        traced = torch.jit.trace_module(module, {"forward": specs["prefill"].example_inputs,
                                                 "step": specs["step"].example_inputs}, check_trace=False)
    foreign = sorted(set(non_host_ops(traced)) | set(non_host_ops(traced.step)))
    if foreign:
        raise ExportError(f"the traced decoder holds ops a C++ host cannot run without Python: {', '.join(foreign)}")
    extra_files = {DECODER_CONFIG_NAME: json.dumps(description, indent=2, sort_keys=True)}
    save_module(traced, os.path.join(folder, description["files"]["module"]), extra_files)


def decoder_callables(folder: str, files: dict[str, str]) -> dict:
    """{"prefill": the module's `forward`, "step": its `step`} (export_decoder's module in folder), on the CPU."""
    with legacy_jit():
        module = torch.jit.load(os.path.join(folder, files["module"]), map_location="cpu")
    return {"prefill": module.forward, "step": module.step}


def node_kinds(path: str) -> collections.Counter:
    """How many nodes of each kind the module in the file at path has."""
    with legacy_jit():
        return collections.Counter(module_node_kinds(torch.jit.load(path, map_location="cpu")))


def open_runner(path: str, device: str, tf32: bool = False) -> tuple:
    """(exporters.runners.Runner, "") over the module in the file at path on device, or (None, why not)."""
    if device == "cuda" and not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    try:
        with legacy_jit():
            module = torch.jit.load(path, map_location=device)
    except Exception as error:  # a file torch cannot load is a failed verification, not a crash
        raise ExportError(f"cannot load TorchScript file {path}: {first_line(error)}") from None
    return module_runner(module, device, tf32), ""
