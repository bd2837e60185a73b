"""Chunk attention (see reformer.ops): `attend`, softmax(scale * q k^T + bias) v within chunks (query
B, H, K, S, D), for local attention and for LSH attention with one hashing round; `attend_with_log_normalizer`,
for LSH attention with several rounds: the masks applied as selects (the masked scores take the mask values
exactly) and each query's log-sum-exp, by which the rounds are combined.

Lowerings of both ops:
- standard: eager's ops as torch.export writes them (MatMul, Mul or Where, Softmax, MatMul; the log-sum-exp as
  max(scores) - log(max(probabilities))). ONNX Runtime folds the key transpose and the scale into FusedMatMul.
- ort: ONNX Runtime's contrib `com.microsoft.MultiHeadAttention` (its 4-D `attention_bias` exists from
  onnxruntime 1.20 on), kept as a custom-domain node.
- onnx-attention: ONNX's `Attention` (opset 23), inlined. The bias goes in as its float `attn_mask`, which is
  added: a boolean mask would become -10000 on ONNX Runtime CUDA, not the model's mask values.
Both fused lowerings fold every leading axis into the op's batch with one head (B*H*K, S, D), and pass the
bias in full, one per batch row: the score matrix stays inside the kernel, which ONNX Runtime CUDA can run as
its memory-efficient attention. Neither op returns a log-sum-exp, so `attend_with_log_normalizer`'s fused
lowerings also write the masked scores (MatMul, two Where, as standard) for an exact one: shifted by the row
maximum, which is finite (a query's own key is at least the self-mask value), and reduced in fp32, so nothing
underflows; the fused op gets the masks as the bias masked - raw scores, exactly 0 at every allowed key.
They skip only the probabilities and the product by the values, so they can pay only where the fused kernel
saves more than the extra score products and bias it reads.

`auto_lowering` is "standard" for both: neither fused op pays on ONNX Runtime CPU. Measured with onnxruntime
1.32 on this project's 2-core AMD EPYC, one thread, the `small` benchmark model at opset 23, the three graphs'
forwards taking turns (`python -m benchmarks.graph_cost --threads 1 --time-lowerings
standard,ort,onnx-attention`, results/cpu-2026-12-02-attention-lowerings.md), median ms:
                             4,096 tokens                      16,384 tokens
                             standard  ort  onnx-attention    standard  ort   onnx-attention
  one round (`attend`)       427       450  425               1843      1938  1826
  2 rounds (--num-hashes 2)  576       645  613               2126      2429  2256
(10 to 12 forwards each; load average 2.1 to 2.4 on the 2 cores, shared: a few percent is noise, ort's
slowdown with two rounds is not.)
Earlier, at 2 threads, `attend` alone (256 chunks of 64 queries by 128 keys, 2 heads of 128, fp32) ran 31 ms
as MultiHeadAttention like the plain graph, and in `small` at 16,384 tokens (`python -m benchmarks.graph_cost
--custom-ops ort`) it cut the bytes written per forward from 2.53 to 2.35 GiB but raised ONNX Runtime's peak
memory from 0.37 to 0.55 GiB and the profiled node time from 613 to 716 ms. On CUDA `benchmarks/gpu_checks`
times both fused lowerings beside the standard one ("onnxruntime-fused" and "onnxruntime-attention", `large`
at 65,536 tokens in fp32, TF32 and fp16); `auto` for CUDA is left to that run's numbers (not run yet)."""

from __future__ import annotations

import onnxscript
import torch
from onnxscript import FLOAT
from onnxscript import opset18 as op
from onnxscript import opset23 as op23

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


@onnxscript.script(opset=REFORMER_OPSET, default_opset=op23)
def attend_onnx_attention(query, key, value, bias, scale: float, dropout: float):
    rows, one_head = op23.Constant(value_ints=[-1]), op23.Constant(value_ints=[1])
    queries, keys = op23.Shape(query, start=-2, end=-1), op23.Shape(key, start=-2, end=-1)
    head_size = op23.Shape(query, start=-1)
    # Every leading axis into Attention's batch, one head (B*, 1, S, D); the mask in full, float (added).
    scores_shape = op23.Concat(op23.Shape(query, end=-1), keys, axis=0)
    mask_rows = op23.Reshape(op23.Expand(bias, scores_shape), op23.Concat(rows, one_head, queries, keys, axis=0))
    out = op23.Attention(
        op23.Reshape(query, op23.Concat(rows, one_head, queries, head_size, axis=0)),
        op23.Reshape(key, op23.Concat(rows, one_head, keys, head_size, axis=0)),
        op23.Reshape(value, op23.Concat(rows, one_head, keys, head_size, axis=0)),
        mask_rows, scale=scale,
    )
    return op23.Reshape(out, op23.Shape(query))


register(CustomOp(
    name="attend",
    onnx_name="Attend",
    lowerings={"standard": lambda context: attend_standard, "ort": lambda context: attend_multi_head_attention,
               "onnx-attention": lambda context: attend_onnx_attention},
    auto_lowering="standard",
))


@onnxscript.script(opset=REFORMER_OPSET, default_opset=op)
def attend_with_log_normalizer_standard(query, key, value, allowed, not_self, mask_value: float,
                                        self_mask_value: float, dropout: float):
    scores = op.MatMul(query, op.Transpose(key, perm=[0, 1, 2, 4, 3]))
    scores = op.Where(allowed, scores, op.CastLike(op.Constant(value_float=mask_value), query))
    scores = op.Where(not_self, scores, op.CastLike(op.Constant(value_float=self_mask_value), query))
    probs = op.Softmax(scores, axis=-1)
    last = op.Constant(value_ints=[-1])
    log_normalizer = op.Sub(op.ReduceMax(scores, last, keepdims=0), op.Log(op.ReduceMax(probs, last, keepdims=0)))
    return op.MatMul(probs, value), log_normalizer


@onnxscript.script(opset=REFORMER_OPSET, default_opset=op)
def attend_with_log_normalizer_multi_head_attention(query, key, value, allowed, not_self, mask_value: float,
                                                    self_mask_value: float, dropout: float):
    raw_scores = op.MatMul(query, op.Transpose(key, perm=[0, 1, 2, 4, 3]))
    scores = op.Where(allowed, raw_scores, op.CastLike(op.Constant(value_float=mask_value), query))
    scores = op.Where(not_self, scores, op.CastLike(op.Constant(value_float=self_mask_value), query))
    # The log-sum-exp of the masked scores, shifted by the row maximum (finite: the query's own key is at least
    # the self-mask value) and in fp32 for every dtype, as torch's CPU softmax and logsumexp reduce fp16.
    last = op.Constant(value_ints=[-1])
    wide = op.Cast(scores, to=FLOAT.dtype)
    row_max = op.ReduceMax(wide, last, keepdims=1)
    log_normalizer = op.Add(op.Log(op.ReduceSum(op.Exp(op.Sub(wide, row_max)), last, keepdims=1)), row_max)
    log_normalizer = op.CastLike(op.Squeeze(log_normalizer, last), query)
    # The masks as the added bias: 0 exactly where a key is allowed (x - x), so the kernel's allowed scores are
    # its own q k; elsewhere its scores land within an ulp of the mask values, which get probability 0 beside
    # any allowed key, or share a row's probability among copies of the same self key (same value vector).
    bias = op.Sub(scores, raw_scores)
    # The inputs expanded to the scores' leading axes (the decoder step's single query serves every round),
    # then folded into the batch.
    leading, rows = op.Shape(scores, end=-2), op.Constant(value_ints=[-1])
    queries, keys = op.Shape(query, start=-2, end=-1), op.Shape(key, start=-2, end=-1)
    head_size, value_size = op.Shape(query, start=-1), op.Shape(value, start=-1)
    out = MICROSOFT.MultiHeadAttention(
        op.Reshape(op.Expand(query, op.Concat(leading, queries, head_size, axis=0)),
                   op.Concat(rows, queries, head_size, axis=0)),
        op.Reshape(op.Expand(key, op.Concat(leading, keys, head_size, axis=0)),
                   op.Concat(rows, keys, head_size, axis=0)),
        op.Reshape(op.Expand(value, op.Concat(leading, keys, value_size, axis=0)),
                   op.Concat(rows, keys, value_size, axis=0)),
        None, None, op.Reshape(bias, op.Concat(rows, op.Constant(value_ints=[1]), queries, keys, axis=0)),
        num_heads=1, scale=1.0,
    )
    return op.Reshape(out, op.Concat(leading, queries, value_size, axis=0)), log_normalizer


@onnxscript.script(opset=REFORMER_OPSET, default_opset=op23)
def attend_with_log_normalizer_onnx_attention(query, key, value, allowed, not_self, mask_value: float,
                                              self_mask_value: float, dropout: float):
    raw_scores = op23.MatMul(query, op23.Transpose(key, perm=[0, 1, 2, 4, 3]))
    scores = op23.Where(allowed, raw_scores, op23.CastLike(op23.Constant(value_float=mask_value), query))
    scores = op23.Where(not_self, scores, op23.CastLike(op23.Constant(value_float=self_mask_value), query))
    # As in attend_with_log_normalizer_multi_head_attention.
    last = op23.Constant(value_ints=[-1])
    wide = op23.Cast(scores, to=FLOAT.dtype)
    row_max = op23.ReduceMax(wide, last, keepdims=1)
    log_normalizer = op23.Add(op23.Log(op23.ReduceSum(op23.Exp(op23.Sub(wide, row_max)), last, keepdims=1)), row_max)
    log_normalizer = op23.CastLike(op23.Squeeze(log_normalizer, last), query)
    bias = op23.Sub(scores, raw_scores)
    leading = op23.Shape(scores, end=-2)
    rows, one_head = op23.Constant(value_ints=[-1]), op23.Constant(value_ints=[1])
    queries, keys = op23.Shape(query, start=-2, end=-1), op23.Shape(key, start=-2, end=-1)
    head_size, value_size = op23.Shape(query, start=-1), op23.Shape(value, start=-1)
    out = op23.Attention(
        op23.Reshape(op23.Expand(query, op23.Concat(leading, queries, head_size, axis=0)),
                     op23.Concat(rows, one_head, queries, head_size, axis=0)),
        op23.Reshape(op23.Expand(key, op23.Concat(leading, keys, head_size, axis=0)),
                     op23.Concat(rows, one_head, keys, head_size, axis=0)),
        op23.Reshape(op23.Expand(value, op23.Concat(leading, keys, value_size, axis=0)),
                     op23.Concat(rows, one_head, keys, value_size, axis=0)),
        op23.Reshape(bias, op23.Concat(rows, one_head, queries, keys, axis=0)), scale=1.0,
    )
    return op23.Reshape(out, op23.Concat(leading, queries, value_size, axis=0)), log_normalizer


def log_normalized_shapes(query, key, value, allowed, not_self, **attributes) -> list[tuple]:
    """out and log-sum-exp: the inputs broadcast (the decoder step's one query meets every round's keys)."""
    leading = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2], allowed.shape[:-2],
                                     not_self.shape[:-2])
    queries = query.shape[-2]
    return [(*leading, queries, value.shape[-1]), (*leading, queries)]


register(CustomOp(
    name="attend_with_log_normalizer",
    onnx_name="AttendWithLogNormalizer",
    lowerings={"standard": lambda context: attend_with_log_normalizer_standard,
               "ort": lambda context: attend_with_log_normalizer_multi_head_attention,
               "onnx-attention": lambda context: attend_with_log_normalizer_onnx_attention},
    auto_lowering="standard",
    output_shapes=log_normalized_shapes,
))
