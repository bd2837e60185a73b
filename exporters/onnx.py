"""The ONNX exporter: torch.export with dynamic batch and sequence, then torch.onnx (dynamo), custom ops
lowered through `exporters.ops`, metadata recorded, the file checked and written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import onnx
import onnx_ir as ir
import torch

from . import ops
from .errors import ExportError, first_line
from .precision import model_as
from .program import export_program
from .specs import INPUT_NAMES, TaskSpec, example_inputs, graph_description, resolve_max_length

# ONNX Runtime runs every opset from 18 (torch.onnx's own lowest) up to 21 with the ops this graph uses.
SUPPORTED_OPSETS = range(18, 22)
# A protobuf file cannot exceed 2 GiB; weights above this share (the graph needs the rest) go to a data file.
EXTERNAL_DATA_THRESHOLD = int(0.9 * 2**31)
METADATA_PREFIX = "reformer_export."


def export_onnx(
    model,
    spec: TaskSpec,
    path,
    *,
    opset: int = 18,
    custom_ops: str = "auto",
    dtype: str = "fp32",
    device: str = "cpu",
    max_length: int | None = None,
    with_buckets: bool = True,
    metadata: dict[str, str] | None = None,
    external_data: bool | None = None,
) -> None:
    """Write `model` (eval mode) as an ONNX graph to `path`: inputs `input_ids`, `attention_mask` (int64,
    [batch, sequence], both dynamic, sequence up to `max_length`, default `max_position_embeddings`), outputs
    `spec.all_output_names(...)`, with the buckets of each LSH layer (B, H, N, L int64) as extra outputs
    when `with_buckets`. `external_data` None: weights go to `<path>.data` only when the file would pass
    2 GiB. dtype "fp16" writes a half-precision graph, meant for CUDA runtimes; ONNX Runtime CPU runs it too
    (thanks to the registry's logsumexp lowering). custom_ops: see exporters/ops/registry.py ("auto" picks
    "ort"). Raises ExportError with a one-line message; leaves nothing at `path` on failure."""
    config = model.config
    max_length = resolve_max_length(config, max_length)
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported: choose {SUPPORTED_OPSETS[0]} to {SUPPORTED_OPSETS[-1]}")
    try:
        mode = ops.resolve_mode(custom_ops)
    except ValueError as error:
        raise ExportError(str(error)) from None
    path = Path(path)
    if not os.access(path.parent, os.W_OK):  # before the slow part
        raise ExportError(f"cannot write to {path.parent}: not a writable folder")
    model = model_as(model, dtype, device)
    wrapper = spec.wrap(model, with_buckets)
    output_names = spec.all_output_names(config.attn_layers.count("lsh"), with_buckets)
    example = example_inputs(config, max_length, device)
    context = ops.LoweringContext.from_config(config, max_length)
    try:
        onnx_model, lowerings = to_onnx_model(
            lambda: export_program(wrapper, example, max_length), mode, context, opset, output_names
        )
    except Exception as error:  # the exporters raise many kinds; the caller needs one, with the reason
        raise ExportError(f"ONNX export failed: {type(error).__name__}: {first_line(error)}") from error
    onnx_model.metadata_props.update(
        export_metadata(config, spec, max_length, opset, custom_ops, lowerings, dtype, with_buckets)
    )
    onnx_model.metadata_props.update({key: str(value) for key, value in (metadata or {}).items()})
    if external_data is None:
        external_data = initializer_bytes(onnx_model) > EXTERNAL_DATA_THRESHOLD
    save_atomically(onnx_model, path, external_data)


def to_onnx_model(
    trace: Callable[[], torch.export.ExportedProgram],
    mode: str,
    context: ops.LoweringContext,
    opset: int,
    output_names: list[str],
    input_names: tuple[str, ...] = INPUT_NAMES,
) -> tuple[ir.Model, dict[str, str]]:
    """Run `trace` (a torch.export call) with the registry's placeholders in place, translate the program
    to ONNX and lower the placeholders for `mode` ("standard" or "ort"). Returns the model and the lowering
    chosen per op."""
    with ops.onnx_placeholders():
        program = trace()
    onnx_program = torch.onnx.export(
        program, dynamo=True, opset_version=opset, input_names=list(input_names), output_names=output_names,
        custom_translation_table=ops.translation_table(mode), verbose=False,
    )
    lowerings = ops.apply_lowerings(onnx_program.model, mode, context)
    return onnx_program.model, lowerings


def export_metadata(config, spec, max_length, opset, custom_ops, lowerings, dtype, with_buckets) -> dict[str, str]:
    values = graph_description(config, spec, max_length=max_length, dtype=dtype, with_buckets=with_buckets)
    values.update(opset=opset, custom_ops=custom_ops, lowerings=lowerings)
    return {METADATA_PREFIX + key: json.dumps(value) for key, value in values.items()}


def initializer_bytes(model: ir.Model) -> int:
    return sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value is not None)


def save_atomically(model: ir.Model, path: Path, external_data: bool) -> None:
    """Write into a temporary folder next to `path`, check the file, then move it (and its data file) in place."""
    data_name = path.name + ".data"
    try:
        temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as error:
        raise ExportError(f"cannot write to {path.parent}: {error.strerror}") from None
    try:
        staged = temporary / path.name
        ir.save(model, staged, external_data=data_name if external_data else None)
        try:
            onnx.checker.check_model(str(staged))
        except onnx.checker.ValidationError as error:
            raise ExportError(f"the exported ONNX file is invalid: {first_line(error)}") from error
        if external_data:
            os.replace(temporary / data_name, path.parent / data_name)
        os.replace(staged, path)
    except OSError as error:
        raise ExportError(f"cannot write {path}: {error.strerror}") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
