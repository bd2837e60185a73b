"""`project_heads_into_chunks`: a bias-free projection of B, L, hidden, split into heads and chunks,
B, H, K, C, D (see reformer.ops.project_heads_into_chunks).

standard: one MatMul of the hidden states, given a head axis of 1, by the weight's rows regrouped per head
(H, hidden, D), which writes B, H, L, D directly; a Reshape then splits the chunks. The stock export projects
to B, L, H*D and then writes a transposed copy (ONNX has no strided views). The weight's regrouping has only
constant inputs, so the exporter or ONNX Runtime folds it once. Measured with onnxruntime 1.32 on this
project's 2-core CPU (`python -m benchmarks.graph_cost --model small --length 16384`): the three transposes of
each local-attention layer, 48 MiB at 16,384 tokens, are gone (bytes written 2.533 -> 2.392 GiB)."""

from __future__ import annotations

import onnxscript
from onnxscript import opset18 as op

from .registry import REFORMER_OPSET, CustomOp, register


@onnxscript.script(opset=REFORMER_OPSET, default_opset=op)
def project_heads_by_head_matmul(hidden_states, weight, num_heads: int, chunk_length: int):
    first_axis, rows = op.Constant(value_ints=[0]), op.Constant(value_ints=[-1])
    heads = op.Unsqueeze(op.Constant(value_int=num_heads), first_axis)
    per_head = op.Transpose(op.Reshape(weight, op.Concat(heads, rows, op.Shape(weight, start=1), axis=0)),
                            perm=[0, 2, 1])  # H, hidden, D
    projected = op.MatMul(op.Unsqueeze(hidden_states, op.Constant(value_ints=[1])), per_head)  # B, H, L, D
    chunked = op.Concat(op.Shape(projected, end=2), rows, op.Unsqueeze(op.Constant(value_int=chunk_length), first_axis),
                        op.Shape(projected, start=3), axis=0)
    return op.Reshape(projected, chunked)  # B, H, K, C, D


def chunked_heads_shape(hidden_states, weight, num_heads: int, chunk_length: int) -> tuple:
    batch, length = hidden_states.shape[0], hidden_states.shape[1]
    return (batch, num_heads, length // chunk_length, chunk_length, weight.shape[0] // num_heads)


register(CustomOp(
    name="project_heads_into_chunks",
    onnx_name="ProjectHeadsIntoChunks",
    lowerings={"standard": lambda context: project_heads_by_head_matmul},
    output_shape=chunked_heads_shape,
))
