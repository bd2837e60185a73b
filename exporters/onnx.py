"""The ONNX exporter: torch.export with dynamic batch and sequence, then torch.onnx (dynamo), custom ops
lowered through `exporters.ops`, metadata recorded, the file checked and written atomically."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import onnx
import onnx_ir as ir
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.optimizer import fold_constants

from . import ops
from .choices import DEFAULT_CUSTOM_OPS, DEFAULT_OPSET, SUPPORTED_OPSETS
from .decoder_graphs import GRAPHS, graph_modules
from .errors import ExportError, first_line
from .onnx_files import save_atomically
from .precision import model_as
from .program import export_graph, export_program
from .runners import Runner, onnxruntime_providers
from .specs import INPUT_NAMES, METADATA_PREFIX, TaskSpec, graph_description, resolve_max_length, wrapper_example_inputs


def export_onnx(
    model,
    spec: TaskSpec,
    path,
    *,
    opset: int = DEFAULT_OPSET,
    custom_ops: str = DEFAULT_CUSTOM_OPS,
    dtype: str = "fp32",
    device: str = "cpu",
    max_length: int | None = None,
    with_buckets: bool = False,
    replay: bool = False,
    metadata: dict[str, str] | None = None,
    external_data: bool | None = None,
    trace_metadata: bool = False,
) -> None:
    """Write `model` (eval mode) as an ONNX graph to `path`: inputs `input_ids`, `attention_mask` (int64,
    [batch, sequence], both dynamic and named `batch_size` and `sequence_length`, sequence up to `max_length`,
    default `max_position_embeddings`), outputs `spec.all_output_names(...)`, with the buckets of each LSH layer
    (B, H, N, L int64) as extra outputs when `with_buckets` (for checking bucket agreement; deployment
    graphs go without: verification has the twin). `replay` writes the verification twin instead
    (exporters.specs.ExportWrapper: extra inputs `forced_buckets_<i>`, bucket outputs always), through the same
    path. `external_data` None: weights go to `<path>.data` only when the file would pass 2 GiB
    (exporters.onnx_files). dtype "fp16" writes a half-precision graph, meant for CUDA runtimes; ONNX Runtime
    CPU runs it too. custom_ops: one of ops.CUSTOM_OPS_MODES (see exporters/ops/registry.py; "auto": each op's
    measured choice). trace_metadata: keep what the exporter records per node (module names, stack traces; see
    strip_trace_metadata), for profiling by layer. Raises ExportError with a one-line message; leaves nothing
    at `path` on failure."""
    config = model.config
    max_length = resolve_max_length(config, max_length)
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported: choose {SUPPORTED_OPSETS[0]} to {SUPPORTED_OPSETS[-1]}")
    try:
        ops.check_mode(custom_ops, opset)
    except ValueError as error:
        raise ExportError(str(error)) from None
    path = Path(path)
    if not os.access(path.parent, os.W_OK):  # before the slow part
        raise ExportError(f"cannot write to {path.parent}: not a writable folder")
    model = model_as(model, dtype, device)
    wrapper = spec.wrap(model, with_buckets, replay)
    lsh_layers = config.attn_layers.count("lsh")
    output_names = spec.all_output_names(lsh_layers, wrapper.with_buckets)
    example = wrapper_example_inputs(wrapper, config, max_length, device)
    context = ops.LoweringContext.from_config(config, max_length)
    try:
        onnx_model, lowerings = to_onnx_model(
            lambda: export_program(wrapper, example, max_length), custom_ops, context, opset, output_names,
            wrapper.input_names(), trace_metadata,
        )
    except Exception as error:  # the exporters raise many kinds; the caller needs one, with the reason
        raise ExportError(f"ONNX export failed: {type(error).__name__}: {first_line(error)}") from error
    name_dynamic_dims(onnx_model, wrapper.dynamic_axes())
    onnx_model.metadata_props.update(
        export_metadata(config, spec, max_length, opset, custom_ops, lowerings, dtype, wrapper.with_buckets)
    )
    onnx_model.metadata_props.update({key: str(value) for key, value in (metadata or {}).items()})
    save_atomically(onnx_model, path, external_data)


def to_onnx_model(
    trace: Callable[[], torch.export.ExportedProgram],
    mode: str,
    context: ops.LoweringContext,
    opset: int,
    output_names: list[str],
    input_names: Sequence[str] = INPUT_NAMES,
    trace_metadata: bool = False,
) -> tuple[ir.Model, dict[str, str]]:
    """Run `trace` (a torch.export call) with the registry's placeholders in place, translate the program
    to ONNX and lower the placeholders for `mode` (one of ops.CUSTOM_OPS_MODES). Returns the model and the
    lowering chosen per op. trace_metadata: keep the per-node records strip_trace_metadata drops."""
    with ops.onnx_placeholders():
        program = trace()
    onnx_program = torch.onnx.export(
        program, dynamo=True, opset_version=opset, input_names=list(input_names), output_names=output_names,
        verbose=False,
    )
    lowerings = ops.apply_lowerings(onnx_program.model, mode, context)
    fold_constant_layouts(onnx_program.model)
    if not trace_metadata:
        strip_trace_metadata(onnx_program.model)
    return onnx_program.model, lowerings


def fold_constant_layouts(model: ir.Model) -> None:
    """Fold, in place, what the inlined lowerings compute from constants alone: small shape arithmetic as the
    exporter's own optimizer does, and every Reshape or Transpose of a constant that nothing else reads (a
    weight regrouped per head), whatever its size, since the folded copy replaces the original in the file.
    ONNX Runtime would fold them when it loads the graph; folding here keeps the file's node list to what runs."""
    def relayouts_a_constant(node: ir.Node) -> bool | None:
        data = node.inputs[0] if node.inputs else None
        if node.op_type in ("Reshape", "Transpose") and data is not None and len(data.uses()) == 1:
            return True  # the folder calls this only once every input is constant
        return None  # the folder's own rules, with its size limits

    fold_constants(model, should_fold=relayouts_a_constant)
    RemoveUnusedNodesPass()(model)


def strip_trace_metadata(model: ir.Model) -> None:
    """Drop what the exporter records per node and value for debugging (stack traces with this machine's
    paths, module names, FX node names): 0.85 MB of byte-lm's 4.96 MB file, and it made the same export differ
    between machines."""
    for graph in (model.graph, *model.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            node.metadata_props.clear()
            node.doc_string = None
            for value in node.outputs:
                value.metadata_props.clear()
        for value in (*graph.inputs, *getattr(graph, "initializers", {}).values()):
            value.metadata_props.clear()


def name_dynamic_dims(model: ir.Model, axes: dict[str, dict[int, str]]) -> None:
    """Give the symbolic dimensions torch.export named s0, s1, ... the names of `axes` (input or output name
    -> axis -> name, as exporters.specs.TaskSpec.dynamic_axes), wherever they occur in the graph."""
    names = {}
    for value in (*model.graph.inputs, *model.graph.outputs):
        for axis, name in axes.get(value.name, {}).items():
            dim = value.shape[axis] if value.shape is not None else None
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                names.setdefault(dim.value, name)
    values = [*model.graph.inputs, *(output for node in ir.traversal.RecursiveGraphIterator(model.graph)
                                     for output in node.outputs)]
    for value in values:
        if value.shape is not None and any(isinstance(dim, ir.SymbolicDim) and dim.value in names
                                           for dim in value.shape):
            value.shape = ir.Shape([names.get(dim.value, dim.value) if isinstance(dim, ir.SymbolicDim) else dim
                                    for dim in value.shape])


def export_metadata(config, spec, max_length, opset, custom_ops, lowerings, dtype, with_buckets) -> dict[str, str]:
    values = graph_description(config, spec, max_length=max_length, dtype=dtype, with_buckets=with_buckets)
    values.update(opset=opset, custom_ops=custom_ops, lowerings=lowerings)
    return {METADATA_PREFIX + key: json.dumps(value) for key, value in values.items()}


def export_decoder(decoder, specs: dict, folder: str, description: dict, *, opset: int = DEFAULT_OPSET,
                   custom_ops: str = DEFAULT_CUSTOM_OPS, quantize: str | None = None, held_out=None) -> None:
    """The prefill and step graphs of causal-lm-with-past (exporters.decoder_graphs: `specs` their names, axes
    and example inputs) into folder under the names
    in description["files"] (each with its data file when over 2 GiB, exporters.onnx_files), through to_onnx_model
    (the registry's lowerings) and quantized when asked: the prefill graph by the recipe the `held_out` windows
    choose (exporters.quantize.quantized_into), the step graph by the prefill's. The description gains the
    opset, the lowering per op and (quantized) "quantization", the prefill graph's description."""
    from .quantize import quantization_of, quantized_into

    try:
        ops.check_mode(custom_ops, opset)
    except ValueError as error:
        raise ExportError(str(error)) from None
    context = ops.LoweringContext.from_config(decoder.config, description["max_length"])
    lowerings, quantization = {}, None
    for name, module in graph_modules(decoder).items():
        spec = specs[name]
        try:
            model, lowerings = to_onnx_model(lambda: export_graph(module, spec), custom_ops, context, opset,
                                             list(spec.output_names), spec.input_names)
        except Exception as error:  # the exporters raise many kinds; the caller needs one, with the reason
            raise ExportError(f"ONNX export of the {name} graph failed: {first_line(error)}") from error
        path = os.path.join(folder, description["files"][name])
        recipe = None if quantization is None else quantization["recipe"]
        with quantized_into(path, quantize, held_out, recipe) as fp32_path:
            save_atomically(model, Path(fp32_path))
        if quantize is not None and quantization is None:
            quantization = quantization_of(path)
    description["opset"], description["lowerings"] = opset, lowerings
    if quantization is not None:
        description["quantization"] = quantization


def decoder_callables(folder: str, files: dict[str, str]) -> dict:
    """{"prefill" | "step": (input_ids, *past) -> [logits, *present]} over the graphs in folder, on the CPU
    through the runtime apps use (reformer.runtime.OnnxGenerator, which reads the file names from
    decoder_config.json as apps do, so `files` goes unused), torch tensors in and out."""
    from reformer.runtime import CPU, OnnxGenerator

    generator = OnnxGenerator(folder, providers=[CPU], io_binding=False)

    def graph(kind: str):
        def call(input_ids, *past):
            logits, present = generator.run(kind, input_ids.numpy(), [tensor.numpy() for tensor in past])
            return [torch.from_numpy(logits), *map(torch.from_numpy, present)]
        return call

    return {kind: graph(kind) for kind in GRAPHS}


def node_kinds(path: str) -> collections.Counter:
    """How many nodes of each op type the graph at path has."""
    model = onnx.load(path, load_external_data=False)
    return collections.Counter(node.op_type for node in model.graph.node)


def open_runner(path: str, device: str, tf32: bool = False, threads: int | None = None,
                keep_arena: bool = False) -> tuple:
    """(exporters.runners.Runner, "") over an ONNX Runtime session of the graph at path on device, or (None,
    why not). threads: intra-op threads (None: one per core). keep_arena: the session's arenas keep what its
    runs grew them to (a benchmark reads a CUDA session's memory off the device), else they shrink after
    each run: verification keeps a graph's and its twin's sessions open together, and a long input's CUDA
    arena is tens of GiB."""
    from reformer.runtime import CPU, CUDA, open_session, shrink_arena_run_options

    provider = {"cpu": CPU, "cuda": CUDA}[device]
    if provider not in onnxruntime_providers():
        return None, f"onnxruntime lists no {provider}"
    try:
        # Quiet: a CUDA provider that cannot load is reported in `skipped`, not logged. TF32 as eager's run
        # (open_session's CUDA options: strict fp32 unless tf32). ONNX Runtime adds its CPU provider after
        # the one named, for the nodes that one cannot run.
        session = open_session(path, [provider], quiet=True, threads=threads, tf32=tf32)
    except Exception as error:
        if device == "cuda":  # the provider is listed but cannot start (no GPU, missing CUDA libraries)
            return None, f"{provider} failed to start: {first_line(error)}"
        raise ExportError(f"ONNX Runtime cannot load {path}: {first_line(error)}") from None
    if provider not in session.get_providers():
        return None, f"{provider} is listed but the session fell back to {session.get_providers()}"
    input_names = [graph_input.name for graph_input in session.get_inputs()]
    run_options = None if keep_arena else shrink_arena_run_options(session)

    def run(inputs):
        feeds = {name: tensor.cpu().numpy() for name, tensor in zip(input_names, inputs)}
        return [torch.from_numpy(output) for output in session.run(None, feeds, run_options)]

    def prepared_call(inputs):
        return prepared_session_call(session, device, dict(zip(input_names, inputs)), run_options)

    return Runner(run, device, [output.name for output in session.get_outputs()], prepared_call=prepared_call,
                  providers=session.get_providers()), ""


def prepared_session_call(session, device: str, inputs: dict, run_options) -> Callable:
    """A call that runs the session once on `inputs` (name -> tensor on device), made ready now: on the CPU,
    `session.run` on numpy feeds; on CUDA, through IO binding, inputs copied to the GPU once and outputs left
    there, as a torch runtime's stay on the device."""
    feeds = {name: tensor.cpu().numpy() for name, tensor in inputs.items()}
    if device == "cpu":
        return lambda: session.run(None, feeds, run_options)
    import onnxruntime

    binding = session.io_binding()
    device_inputs = {name: onnxruntime.OrtValue.ortvalue_from_numpy(array, "cuda", 0) for name, array in feeds.items()}
    for name, value in device_inputs.items():
        binding.bind_ortvalue_input(name, value)
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")

    def run():
        session.run_with_iobinding(binding, run_options)
        return device_inputs  # the closure keeps the device inputs alive as long as the binding is used

    return run
