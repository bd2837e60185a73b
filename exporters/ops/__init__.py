"""Custom-op registry with fallbacks: see `registry` for the mechanism, one module per op for its lowerings.

Registered: `attend` (chunk attention of local layers and of LSH layers with one hashing round) and
`attend_with_log_normalizer` (LSH layers with several rounds, which need each query's log-sum-exp), both with
an ort lowering (ONNX Runtime's fused MultiHeadAttention) and an onnx-attention one (ONNX's Attention op,
opset 23; see `attention` for the exact log-sum-exp beside them), `sort_by_bucket` (float sort keys pay on ONNX
Runtime CUDA), `invert_permutation` (scatter, one lowering), `project_heads_into_chunks` (local attention's
projections written per head by one MatMul, without the transposed copy the stock export makes). Not
registered: the chunks' neighbour gather (`look_adjacent`), which lowers to one plain `Gather` that ONNX Runtime
CUDA runs at memory bandwidth (measured on an H100: `GatherElements` over [1, 8, 131072, 128] fp32 at about
2.1 TB/s, as fast as `torch.gather`)."""

from . import attention, bucket_sort, permutation, projection  # noqa: F401  (registers the ops)
from .registry import (
    CUSTOM_OPS_MODES,
    DOMAIN,
    KEPT_LOWERINGS,
    LOWERINGS,
    MODE_MIN_OPSET,
    REGISTRY,
    CustomOp,
    LoweringContext,
    apply_lowerings,
    onnx_placeholders,
    check_mode,
)

__all__ = [
    "CUSTOM_OPS_MODES", "DOMAIN", "KEPT_LOWERINGS", "LOWERINGS", "MODE_MIN_OPSET", "REGISTRY",
    "CustomOp", "LoweringContext", "apply_lowerings", "onnx_placeholders", "check_mode",
]
