"""`sort_by_bucket`: positions in bucket order, ties by position.

Both lowerings sort the unique key `bucket * L + position` with `TopK(k=L, largest=0)`, which is then the
stable order whatever TopK does with ties (there are none). Standard: int64 keys, exact for any size.
ort: float32 keys, which ONNX Runtime CUDA sorts faster (1.2 ms against 1.9 ms for 16 rows of n = 64K to
128K on an H100, onnxruntime-gpu 1.31.1), exact while every key is below 2^24; beyond that bound the ort
lowering keeps int64 keys (still as a custom-domain node, so a host with a `reformer::BucketArgsort` kernel
can run its own sort).

Not built: a counting sort (each position's rank = the positions in lower buckets plus the earlier positions
in its own, by a CumSum over a one-hot of the buckets). Its one-hot holds L x buckets entries per row: for the
`large` benchmark model at 65,536 tokens, 16 rows x 65,536 x 513 int64 = 4.3 GB per LSH layer. TopK there
takes about 1.2 ms per layer (16 rows), some 7 ms of ONNX Runtime CUDA's 295 ms forward over its 6 LSH
layers: the sort is not where the time goes."""

from __future__ import annotations

import onnx
import onnxscript
from onnxscript import INT64
from onnxscript import opset18 as op

from .registry import REFORMER_OPSET, CustomOp, LoweringContext, register

FLOAT = onnx.TensorProto.FLOAT
# Largest integer below which every integer is exact in float32.
FLOAT32_EXACT_INTEGERS = 2**24


@onnxscript.script(opset=REFORMER_OPSET, default_opset=op)
def bucket_argsort_int64_keys(buckets: INT64) -> INT64:
    length = op.Shape(buckets, start=-1)
    positions = op.Range(op.Constant(value_int=0), op.Squeeze(length), op.Constant(value_int=1))
    keys = buckets * length + positions
    _, order = op.TopK(keys, length, axis=-1, largest=0, sorted=1)
    return order


@onnxscript.script(opset=REFORMER_OPSET, default_opset=op)
def bucket_argsort_float_keys(buckets: INT64) -> INT64:
    length = op.Shape(buckets, start=-1)
    positions = op.Range(op.Constant(value_int=0), op.Squeeze(length), op.Constant(value_int=1))
    keys = op.Cast(buckets, to=FLOAT) * op.Cast(length, to=FLOAT) + op.Cast(positions, to=FLOAT)
    _, order = op.TopK(keys, length, axis=-1, largest=0, sorted=1)
    return order


def float_keys_if_exact(context: LoweringContext) -> onnxscript.OnnxFunction:
    largest_key = context.bucket_count * context.max_length - 1
    return bucket_argsort_float_keys if largest_key < FLOAT32_EXACT_INTEGERS else bucket_argsort_int64_keys


register(CustomOp(
    name="sort_by_bucket",
    onnx_name="BucketArgsort",
    lowerings={"standard": lambda context: bucket_argsort_int64_keys, "ort": float_keys_if_exact},
))
