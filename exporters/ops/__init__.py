"""Custom-op registry with fallbacks: see `registry` for the mechanism, one module per op for its lowerings.

Registered: `sort_by_bucket` (float sort keys pay on ONNX Runtime CUDA), `invert_permutation` (scatter, one
lowering), and `aten::logsumexp` (torchlib's lowering is NaN in fp16 on ONNX Runtime CPU).
Decided against registering more ops: the chunked attention's gathers (`look_adjacent`) already lower to
plain `Gather`, which ONNX Runtime CUDA runs at memory bandwidth (measured on an H100: `GatherElements` over
[1, 8, 131072, 128] fp32 at about 2.1 TB/s, as fast as `torch.gather`), and a fused chunked-attention
op has no ONNX Runtime kernel to map to (the `com.microsoft` attention ops return no log-sum-exp, which LSH
needs to combine hashing rounds, and know no self-mask value), so its lowering would equal the graph the
exporter already writes."""

from . import bucket_sort, logsumexp, permutation  # noqa: F401  (registers the ops)
from .registry import (
    CUSTOM_OPS_MODES,
    DOMAIN,
    LOWERINGS,
    REGISTRY,
    AtenOverride,
    CustomOp,
    LoweringContext,
    apply_lowerings,
    onnx_placeholders,
    resolve_mode,
    translation_table,
)

__all__ = [
    "CUSTOM_OPS_MODES", "DOMAIN", "LOWERINGS", "REGISTRY", "AtenOverride", "CustomOp", "LoweringContext",
    "apply_lowerings", "onnx_placeholders", "resolve_mode", "translation_table",
]
