"""`aten::logsumexp`, which the model uses to combine LSH hashing rounds: `reformer.attention.lsh.combine_rounds`
weights the rounds by their log-normalisers, cast to fp32 first. The attention's own log-normalisers do not
use it (`reformer.ops.attend_with_log_normalizer` takes them from its softmax).

torchlib lowers it to `ReduceLogSumExp`, defined as log(sum(exp(x))). ONNX Runtime's CPU kernel computes
exactly that in fp16: exp underflows below about -17 and overflows above about 11, so a row of -1e3 (fp16's
self-mask value) gives -inf (measured, onnxruntime 1.31 and 1.32); in fp32 it stays finite (rows of -1e5
and of 100 measured, 1.32). The lowering here subtracts the row maximum first, as torch does, and reduces fp16
inputs in fp32, as torch's CPU kernel does: an fp16 logsumexp stays finite, and the model's fp32 one gives
ReduceLogSumExp's results."""

from __future__ import annotations

from typing import Sequence

import onnx_ir as ir
import torch
from onnxscript import FLOAT
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.tensor_typing import TFloat

from .registry import AtenOverride, register


def max_shifted_logsumexp(self: TFloat, dim: Sequence[int], keepdim: bool = False) -> TFloat:
    axes = op.Constant(value_ints=list(dim))
    reduced_precision = self.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    x = op.Cast(self, to=FLOAT.dtype) if reduced_precision else self
    row_max = op.ReduceMax(x, axes, keepdims=1)
    # A row of -inf (or +inf) has no finite maximum to shift by; shifting by 0 gives torch's -inf (+inf).
    shift = op.Where(op.IsInf(row_max), op.CastLike(0.0, row_max), row_max)
    result = op.Add(op.Log(op.ReduceSum(op.Exp(op.Sub(x, shift)), axes, keepdims=1)), shift)
    if not keepdim:
        result = op.Squeeze(result, axes)
    return op.CastLike(result, self) if reduced_precision else result


register(AtenOverride(
    name="logsumexp",
    target=torch.ops.aten.logsumexp.default,
    eager=lambda x: torch.logsumexp(x, dim=-1),
    lowerings={"standard": max_shifted_logsumexp},
))
