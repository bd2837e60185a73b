"""torch.export with dynamic batch and sequence axes, the front half of the ONNX exporter."""

from __future__ import annotations

import torch
import torch.fx.experimental._config as fx_config
from torch.export import Dim


def dynamic_shapes(max_length: int) -> dict[str, dict[int, Dim]]:
    batch = Dim("batch_size", min=1, max=4096)
    sequence = Dim("sequence_length", min=1, max=max_length)
    return {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}


def export_program(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], max_length: int):
    """An ExportedProgram valid for every batch size and every length up to max_length.

    Size-oblivious reasoning keeps torch.export from specialising on the example's number of chunks
    (a view of a tensor with one chunk is contiguous, with more it is not; both give the same values)."""
    with fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes(max_length))
