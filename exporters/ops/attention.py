"""`attend`: softmax(scale * q k^T + bias) v within chunks (query B, H, K, S, D; see reformer.ops.attend).

standard: MatMul, Mul, Add, Softmax, MatMul, as torch.export writes eager's ops (ONNX Runtime folds the key
transpose and the scale into its FusedMatMul).
ort: ONNX Runtime's contrib `com.microsoft.MultiHeadAttention` with the leading axes folded into its batch and
one head, the bias as its `attention_bias`: the score matrix stays inside the kernel, which ONNX Runtime
CUDA can run as a fused attention (not measured yet: `benchmarks/gpu_checks` times it as "onnxruntime-fused").
Not the default (`auto_lowering`): on ONNX Runtime CPU it does not pay.
Measured with onnxruntime 1.32 on this project's 2-core CPU: alone (256 chunks of 64 queries by 128 keys,
2 heads of 128, fp32) it ran 31 ms like the plain graph, with equal results; in the `small` benchmark model
at 16,384 tokens (`python -m benchmarks.graph_cost --custom-ops ort`) it cut the bytes written per forward from
2.53 to 2.35 GiB but raised ONNX Runtime's peak memory from 0.37 to 0.55 GiB and the profiled node time from
613 to 716 ms. `attention_bias` exists from onnxruntime 1.20 on."""

from __future__ import annotations

import onnxscript
from onnxscript import opset18 as op

from .registry import REFORMER_OPSET, CustomOp, register

MICROSOFT = onnxscript.values.Opset("com.microsoft", 1)


@onnxscript.script(opset=REFORMER_OPSET, default_opset=op)
def attend_standard(query, key, value, bias, scale: float, dropout: float):
    scale_value = op.CastLike(op.Constant(value_float=scale), query)
    scores = op.Add(op.Mul(op.MatMul(query, op.Transpose(key, perm=[0, 1, 2, 4, 3])), scale_value), bias)
    return op.MatMul(op.Softmax(scores, axis=-1), value)


@onnxscript.script(opset=REFORMER_OPSET, default_opset=op)
def attend_multi_head_attention(query, key, value, bias, scale: float, dropout: float):
    rows = op.Constant(value_ints=[-1])
    queries, keys = op.Shape(query, start=-2, end=-1), op.Shape(key, start=-2, end=-1)
    head_size = op.Shape(query, start=-1)
    # Every leading axis into MultiHeadAttention's batch, one head; the bias in full, one per batch row.
    scores_shape = op.Concat(op.Shape(query, end=-1), keys, axis=0)
    bias_rows = op.Reshape(op.Expand(bias, scores_shape), op.Concat(rows, op.Constant(value_ints=[1]), queries, keys,
                                                                     axis=0))
    out = MICROSOFT.MultiHeadAttention(
        op.Reshape(query, op.Concat(rows, queries, head_size, axis=0)),
        op.Reshape(key, op.Concat(rows, keys, head_size, axis=0)),
        op.Reshape(value, op.Concat(rows, keys, head_size, axis=0)),
        None, None, bias_rows, num_heads=1, scale=scale,
    )
    return op.Reshape(out, op.Shape(query))


register(CustomOp(
    name="attend",
    onnx_name="Attend",
    lowerings={"standard": lambda context: attend_standard, "ort": lambda context: attend_multi_head_attention},
    auto_lowering="standard",
))
