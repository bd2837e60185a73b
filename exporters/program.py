"""torch.export with dynamic axes, the front half of every ONNX export and AOTInductor package."""

from __future__ import annotations

import torch
import torch.fx.experimental._config as fx_config
from torch.export import Dim

from .specs import FORCED_BUCKETS_PREFIX

MAX_BATCH = 4096


def batch_dim() -> Dim:
    return Dim("batch_size", min=1, max=MAX_BATCH)


def dynamic_shapes(axes: dict[str, dict[int, str]], input_names: list[str], max_length: int) -> dict[str, object]:
    """torch.export's dynamic shapes of a task graph's inputs, from its spec's axes (exporters.specs.TaskSpec
    .dynamic_axes, whose names the ONNX graph's dimensions also take): input_ids and attention_mask
    [batch, sequence], and a verification twin's forced buckets [batch, heads, rounds, sequence] as the one
    tuple argument exporters.specs.ExportWrapper takes."""
    dims = {"batch_size": batch_dim(), "sequence_length": Dim("sequence_length", min=1, max=max_length)}

    def shape(name: str) -> dict:
        return {axis: dims[dim] for axis, dim in axes[name].items()}

    forced = [name for name in input_names if name.startswith(FORCED_BUCKETS_PREFIX)]
    shapes: dict[str, object] = {name: shape(name) for name in input_names if name not in forced}
    if forced:
        shapes["forced_buckets"] = tuple(map(shape, forced))
    return shapes


def size_oblivious():
    """Size-oblivious reasoning about dynamic sizes: no specialising on the example's sizes (a view of a tensor
    with one chunk is contiguous, with more it is not; both give the same values), and sizes 0 and 1 stay in
    range. torch.export needs it, and so does AOTInductor, which reasons about the sizes again: without it a
    package assumes batch >= 2 and the sequence longer than the shortest its guards allowed."""
    return fx_config.patch(backed_size_oblivious=True)


def export_dynamic(module: torch.nn.Module, example_inputs: tuple, shapes) -> torch.export.ExportedProgram:
    """torch.export.export valid for every size the dynamic dims allow (see size_oblivious)."""
    with size_oblivious():
        return torch.export.export(module, example_inputs, dynamic_shapes=shapes)


def export_program(wrapper, example_inputs: tuple, max_length: int):
    """The ExportedProgram of a task graph (an exporters.specs.ExportWrapper), valid for every batch size and
    every length up to max_length. example_inputs: (input_ids, attention_mask), and for a verification twin a
    tuple of forced buckets."""
    return export_dynamic(wrapper, example_inputs, dynamic_shapes(wrapper.dynamic_axes(), wrapper.input_names(),
                                                                  max_length))
