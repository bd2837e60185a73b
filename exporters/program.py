"""torch.export with dynamic axes, the front half of every ONNX export and AOTInductor package."""

from __future__ import annotations

import torch
import torch.fx.experimental._config as fx_config
from torch.export import Dim

from .specs import GraphSpec


def dynamic_shapes(graph: GraphSpec) -> dict[str, object]:
    """torch.export's dynamic shapes of a graph's inputs, one Dim per dimension name of its spec's axes (the names
    its ONNX graph's dimensions also take), with the spec's range; inputs the spec packs into one argument (a
    verification twin's forced buckets, the step's past cache) as that argument's tuple."""
    dims = {name: Dim(name, min=low, max=high) for name, (low, high) in graph.dim_ranges.items()}

    def shape(name: str) -> dict:
        return {axis: dims[dim] for axis, dim in graph.dynamic_axes[name].items()}

    packed = [name for name in graph.input_names if graph.packed and name.startswith(graph.packed[1])]
    shapes: dict[str, object] = {name: shape(name) for name in graph.input_names if name not in packed}
    if packed:
        shapes[graph.packed[0]] = tuple(map(shape, packed))
    return shapes


def size_oblivious():
    """Size-oblivious reasoning about dynamic sizes: no specialising on the example's sizes (a view of a tensor
    with one chunk is contiguous, with more it is not; both give the same values), and sizes 0 and 1 stay in
    range. torch.export needs it, and so does AOTInductor, which reasons about the sizes again: without it a
    package assumes batch >= 2 and the sequence longer than the shortest its guards allowed."""
    return fx_config.patch(backed_size_oblivious=True)


def export_graph(module: torch.nn.Module, graph: GraphSpec) -> torch.export.ExportedProgram:
    """torch.export.export of module at its spec's example inputs, valid for every size the spec's dynamic axes
    allow (see size_oblivious)."""
    with size_oblivious():
        return torch.export.export(module, graph.example_inputs, dynamic_shapes=dynamic_shapes(graph))


def export_program(wrapper, example_inputs: tuple, max_length: int):
    """The ExportedProgram of a task graph (an exporters.specs.ExportWrapper), valid for every batch size and
    every length up to max_length. example_inputs: (input_ids, attention_mask), and for a verification twin a
    tuple of forced buckets."""
    return export_graph(wrapper, wrapper.graph_spec(example_inputs, max_length))
