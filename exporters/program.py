"""torch.export with dynamic axes, the front half of every ONNX export and AOTInductor package."""

from __future__ import annotations

import torch
import torch.fx.experimental._config as fx_config
from torch.export import Dim

MAX_BATCH = 4096


def batch_dim() -> Dim:
    return Dim("batch_size", min=1, max=MAX_BATCH)


def dynamic_shapes(max_length: int, forced_buckets: int | None = None) -> dict[str, object]:
    """A task graph's inputs: input_ids and attention_mask, [batch, sequence]; a verification twin's also
    `forced_buckets` tensors [batch, heads, rounds, sequence] (their number given)."""
    batch = batch_dim()
    sequence = Dim("sequence_length", min=1, max=max_length)
    shapes: dict[str, object] = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
    if forced_buckets is not None:
        shapes["forced_buckets"] = tuple({0: batch, 3: sequence} for _ in range(forced_buckets))
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


def export_program(module: torch.nn.Module, example_inputs: tuple, max_length: int):
    """A task graph's ExportedProgram, valid for every batch size and every length up to max_length.
    example_inputs: (input_ids, attention_mask), and for a verification twin a tuple of forced buckets."""
    forced = len(example_inputs[2]) if len(example_inputs) > 2 else None
    return export_dynamic(module, example_inputs, dynamic_shapes(max_length, forced))
