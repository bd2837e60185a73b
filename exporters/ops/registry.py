"""The custom-op registry: every op whose ONNX lowering the exporter chooses, with its eager implementation
and its lowerings: a `CustomOp` for each replaceable function of `reformer.ops` (the one definition of its math).

How a CustomOp reaches the ONNX file: while torch.export traces the model, `onnx_placeholders()` routes each
registered `reformer.ops` function to a node `reformer::<OnnxName>` of the custom domain (in the exporting
thread only: `reformer.ops.replaced`). After translation, `apply_lowerings` gives every such node a
model-local ONNX function as its body, then either inlines it (the op becomes standard ONNX ops any runtime
runs) or keeps the node with its function (ONNX Runtime inlines a model-local function when it has no kernel
for the op; a host that registers a kernel for `reformer::<OnnxName>` gets that kernel instead). TorchScript
never sees the placeholders: it traces the eager functions as plain ATen ops.

Lowerings: "standard" (every op has one, made of standard ONNX ops; a CustomOp's is inlined), "ort" (only
where it may pay on ONNX Runtime; a CustomOp's stays a custom-domain node) and "onnx-attention" (the attention
ops as the standard ONNX `Attention` op of opset 23, inlined like "standard": any runtime with opset 23 runs
it). Modes (`--custom-ops`): "standard" uses only standard lowerings; "ort" and "onnx-attention" use an op's
lowering of that name where it has one and its standard lowering otherwise; "auto" uses each op's
`auto_lowering`: "ort" where that was measured to pay on ONNX Runtime (every runtime this project targets is
ONNX Runtime, which runs model-local functions), "standard" where it did not.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import onnx_ir as ir
import onnxscript
import torch
from onnx_ir.passes.common import InlinePass, RemoveUnusedOpsetsPass

import reformer.ops

from ..choices import CUSTOM_OPS_MODES

DOMAIN = "reformer"
DOMAIN_VERSION = 1
# The opset that CustomOp lowerings (onnxscript functions) are written in.
REFORMER_OPSET = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)
LOWERINGS = ("standard", "ort", "onnx-attention")
# Lowerings kept as custom-domain nodes with their function (the others are inlined into standard ONNX ops).
KEPT_LOWERINGS = ("ort",)
# The lowest ONNX opset of each mode that needs more than opset 18 (ONNX's Attention op is new in opset 23).
MODE_MIN_OPSET = {"onnx-attention": 23}


@dataclass(frozen=True)
class LoweringContext:
    """What a lowering may rely on about its inputs, fixed at export time.

    bucket_count: buckets per hashing round, the padding bucket included (bucket ids are below this).
    max_length: the longest (internally padded) sequence the exported graph accepts."""

    bucket_count: int
    max_length: int

    @classmethod
    def from_config(cls, config, max_length: int) -> "LoweringContext":
        padded_length = math.ceil(max_length / config.padding_multiple) * config.padding_multiple
        bucket_count = config.bucket_count + 1 if config.num_buckets is not None else 1
        return cls(bucket_count=bucket_count, max_length=padded_length)


@dataclass(frozen=True)
class CustomOp:
    """name: the function's name in `reformer.ops` (the registry key); onnx_name: the op's name in the custom
    domain; lowerings: lowering name -> function of the LoweringContext giving the op's ONNX function body;
    auto_lowering: the lowering mode "auto" picks where the op has it. A registered op returns
    one tensor of its first input's dtype, and of its first input's shape unless `output_shape` (given the
    op's inputs and attributes) says otherwise; an op with several outputs gives `output_shapes` instead (one
    shape per output, each of the first input's dtype) and returns a tuple. The model passes its non-tensor
    arguments by keyword, and they become the node's attributes."""

    name: str
    onnx_name: str
    lowerings: dict[str, Callable]
    auto_lowering: str = "ort"
    output_shape: Callable[..., tuple] | None = None
    output_shapes: Callable[..., list[tuple]] | None = None

    def lowering_for(self, mode: str) -> str:
        """The lowering this op gets under a mode of CUSTOM_OPS_MODES."""
        if mode == "auto":
            mode = self.auto_lowering
        return mode if mode in self.lowerings else "standard"

    @property
    def eager(self) -> Callable[..., torch.Tensor]:
        """The eager implementation, the function the model calls: under `onnx_placeholders` (in the same
        thread) a call emits the placeholder."""
        return getattr(reformer.ops, self.name)

    def placeholder(self, *inputs: torch.Tensor, **attributes) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The custom-domain node, with the function's keyword arguments as its attributes."""
        first = inputs[0]
        if self.output_shapes is not None:
            shapes = self.output_shapes(*inputs, **attributes)
            outputs = torch.onnx.ops.symbolic_multi_out(
                f"{DOMAIN}::{self.onnx_name}", inputs, attributes, dtypes=[first.dtype] * len(shapes), shapes=shapes,
                version=DOMAIN_VERSION,
            )
            return tuple(output.to(first.device) for output in outputs)
        shape = first.shape if self.output_shape is None else self.output_shape(*inputs, **attributes)
        # torch.onnx.ops.symbolic's fake result is made on the CPU whatever its input's device; a CUDA export
        # then fails on the first op that mixes it with a CUDA tensor. Moving it adds no node on the CPU.
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{self.onnx_name}", inputs, attributes, dtype=first.dtype, shape=shape,
            version=DOMAIN_VERSION,
        ).to(first.device)


REGISTRY: dict[str, CustomOp] = {}


def register(op: CustomOp) -> CustomOp:
    if "standard" not in op.lowerings or not set(op.lowerings) <= set(LOWERINGS):
        raise ValueError(f"{op.name}: lowerings must include 'standard' and be among {LOWERINGS}")
    if op.name not in reformer.ops.REPLACEABLE:
        raise ValueError(f"reformer.ops has no replaceable function {op.name!r}")
    REGISTRY[op.name] = op
    return op


def check_mode(custom_ops: str, opset: int | None = None) -> None:
    """Raise ValueError unless custom_ops is one of CUSTOM_OPS_MODES and, where an opset is given, that mode's
    ops exist in it."""
    if custom_ops not in CUSTOM_OPS_MODES:
        raise ValueError(f"custom_ops must be one of {', '.join(CUSTOM_OPS_MODES)}, not {custom_ops!r}")
    min_opset = MODE_MIN_OPSET.get(custom_ops)
    if opset is not None and min_opset is not None and opset < min_opset:
        raise ValueError(f"custom ops {custom_ops} need opset {min_opset} or higher (ONNX's Attention op): "
                         f"add --opset {min_opset}")


def onnx_placeholders(ops: dict[str, CustomOp] | None = None) -> contextlib.AbstractContextManager[None]:
    """Within, in this thread (or asyncio task) only: `reformer.ops` functions emit custom-domain placeholder
    nodes (for torch.export only)."""
    return reformer.ops.replaced({name: op.placeholder for name, op in (REGISTRY if ops is None else ops).items()})


def apply_lowerings(
    model: ir.Model, mode: str, context: LoweringContext, ops: dict[str, CustomOp] | None = None
) -> dict[str, str]:
    """Give each placeholder node its lowering (in place). Returns the lowering chosen per op name."""
    ops = REGISTRY if ops is None else ops
    chosen = {name: op.lowering_for(mode) for name, op in ops.items()}
    used = {node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph) if node.domain == DOMAIN}
    kept = set()
    for op in ops.values():
        if op.onnx_name not in used:
            continue
        proto = op.lowerings[chosen[op.name]](context).to_function_proto()
        proto.name, proto.domain = op.onnx_name, DOMAIN
        # ONNX wants a function's default-domain version to equal the model's. The bodies use opset 18 ops
        # whose semantics stay the same up to opset 23 (exporters.choices.SUPPORTED_OPSETS; later versions only
        # add types), and the "onnx-attention" bodies opset 23's Attention, whose mode needs opset 23.
        for opset_import in proto.opset_import:
            if opset_import.domain == "":
                opset_import.version = model.opset_imports[""]
        function = ir.serde.deserialize_function(proto)
        model.functions[function.identifier()] = function
        if chosen[op.name] in KEPT_LOWERINGS:
            kept.add(function.identifier())
    InlinePass(criteria=lambda function: function.identifier() not in kept)(model)
    RemoveUnusedOpsetsPass()(model)
    return chosen
