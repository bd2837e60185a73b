"""Near-tie certificates: proof that a bucket a runtime chose differently from eager is a rounding effect.

An LSH layer hashes a vector v (the layer-normed input projected by `query_key`, one per head and position)
by the argmax over its rotated projections p_j = s_j <v, r_j> (r_j a column of the layer's random rotations,
s_j = +1 or -1: the argmax runs over the projections and their negations; with factorised bucket counts,
once per factor). Say eager chose column a and the runtime column b != a. The certificate compares eager's
margin between them, m = p_a - p_b, computed in float64 from eager's own vector, with a bound beta on how far
rounding can move that margin:

    |m| <= beta = (rho + D * u_acc + u) * |v| * (|r_a| + |r_b|)

Derivation. Let p be the exact projections of eager's vector, p~ eager's and p' the runtime's computed ones.
Eager chose a, so p~_a >= p~_b; the runtime chose b, so p'_b >= p'_a. If every computed projection is within
e_j of the exact one, then m = p_a - p_b <= (p'_a - p'_b) + e_a + e_b <= e_a + e_b, and likewise
m >= -(e_a + e_b): a flip can only happen where |m| <= e_a + e_b. Each e_j has three parts:
- the hashed vector itself differs from eager's: in a replayed run (eager's buckets forced in every LSH
  layer) only through arithmetic, which verification bounds by the replay tolerance rho relative to the
  outputs' scale; a vector within rho |v| of eager's moves <v, r_j> by at most rho |v| |r_j|
  (Cauchy-Schwarz);
- the dot product over the head size D, accumulated in precision u_acc: at most D u_acc sum_i |v_i r_ji|
  <= D u_acc |v| |r_j| (the standard bound gamma_D ~ D u_acc on a sum of D products);
- rounding the projection to the runtime's dtype: u |p_j| <= u |v| |r_j|.
Adding them gives beta. u is the unit roundoff of the precision (2^-24 for fp32; 2^-11 for fp16 and for
TF32, whose matrix inputs keep 10 mantissa bits); u_acc is fp32's, as every runtime here accumulates fp16
and TF32 products in fp32. The bound is deliberately generous (Cauchy-Schwarz is loose by about sqrt(D)
for random rotations), and still orders of magnitude below the margins of a real hashing difference:
rotated projections are spread like |v| and their top gaps like |v| / sqrt(2 ln R), so a graph that hashes
differently (a wrong rotation, a wrong input to the hash) flips tokens with margins far above beta.

A disagreement whose margin exceeds beta is not a near-tie: the runtime hashed something else.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from reformer.attention.lsh import LSHSelfAttention, bucket_factor_slices

# Accumulation precision of dot products on every runtime verified here (fp32, also for fp16 and TF32).
ACCUMULATION_UNIT_ROUNDOFF = 2.0**-24


@dataclass(frozen=True)
class Precision:
    """How a runtime computes: `relative_tolerance` bounds the replayed outputs' error relative to their
    scale (and, by the derivation above, the hashed vectors' deviation); `unit_roundoff` is the dtype's."""

    name: str
    relative_tolerance: float
    unit_roundoff: float


# fp32: same ops in the same order as eager; only kernel rounding (u = 6e-8) separates them. Deep stacks of
# sums over hidden sizes of thousands move outputs by ~1e-7 to 1e-6 of their scale (measured: 7.6e-6 on
# logits of magnitude 10); 1e-5 leaves ~170 ulps of room and still catches any wrong op, whose error is of the
# order of the outputs. fp16 and TF32 keep 11 significant bits (u = 4.9e-4) and round intermediates
# differently per implementation; 1e-2 allows ~20 ulps of the output scale, a wrong graph errs by ~100%.
PRECISIONS = {
    "fp32": Precision("fp32", 1e-5, 2.0**-24),
    "tf32": Precision("tf32", 1e-2, 2.0**-11),
    "fp16": Precision("fp16", 1e-2, 2.0**-11),
}


@dataclass
class Disagreement:
    """One bucket assignment a runtime chose differently from eager, with its certificate."""

    layer: int  # index among the LSH layers
    batch: int
    head: int
    round: int
    position: int
    margin: float  # eager's float64 margin between its choice and the runtime's (worst factor)
    bound: float  # beta for that factor

    @property
    def certified(self) -> bool:
        return abs(self.margin) <= self.bound

    @property
    def ratio(self) -> float:
        return abs(self.margin) / self.bound if self.bound > 0 else float("inf")

    def describe(self) -> str:
        return (f"LSH layer {self.layer} batch row {self.batch} head {self.head} round {self.round} position "
                f"{self.position}: margin {abs(self.margin):.3g} vs bound {self.bound:.3g}")


@contextlib.contextmanager
def recorded_hash_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within: every LSH layer's call appends its input (B, Lp, hidden, the layer-normed hidden states at
    the internally padded length) to the yielded list, in layer order."""
    recorded: list[torch.Tensor] = []
    handles = [module.register_forward_hook(lambda module, args, output: recorded.append(args[0].detach()))
               for module in model.modules() if isinstance(module, LSHSelfAttention)]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def lsh_layers(model: nn.Module) -> list[LSHSelfAttention]:
    return [module for module in model.modules() if isinstance(module, LSHSelfAttention)]


def certify(
    layer: LSHSelfAttention,
    layer_index: int,
    hash_input: torch.Tensor,
    eager_buckets: torch.Tensor,
    runtime_buckets: torch.Tensor,
    keep: torch.Tensor,
    precision: Precision,
) -> list[Disagreement]:
    """Every kept position where runtime_buckets (B, H, N, L) differ from eager_buckets, with eager's margin
    (from hash_input, eager's recorded input of this layer) and its bound. keep: B, L bool."""
    device = eager_buckets.device
    runtime_buckets = runtime_buckets.to(device)
    differs = (runtime_buckets != eager_buckets) & keep.to(device)[:, None, None, :]
    batch, head, rounds, position = differs.nonzero(as_tuple=True)
    if batch.numel() == 0:
        return []
    # Eager's hashed vectors at the disagreeing positions, in float64: F, D.
    weight = layer.query_key.weight.to(device=device, dtype=torch.float64)
    inputs = hash_input.to(device)[batch, position].double()  # F, hidden
    vectors = F.linear(inputs, weight).view(-1, layer.num_heads, layer.head_size)
    vectors = vectors[torch.arange(len(head), device=device), head]  # F, D
    rotations = layer.rotations.to(device=device, dtype=torch.float64)  # H, D, N, R/2
    vector_norms = vectors.norm(dim=-1)
    slack = precision.relative_tolerance + layer.head_size * ACCUMULATION_UNIT_ROUNDOFF + precision.unit_roundoff
    eager_ids = eager_buckets[batch, head, rounds, position]
    runtime_ids = runtime_buckets[batch, head, rounds, position]
    margins = torch.zeros(len(batch), dtype=torch.float64, device=device)
    bounds = torch.full_like(margins, float("inf"))
    worst_ratio = torch.full_like(margins, -1.0)
    for start, half, stride in bucket_factor_slices(layer.bucket_factors):
        eager_factor = (eager_ids // stride) % (2 * half)
        runtime_factor = (runtime_ids // stride) % (2 * half)
        differs_here = eager_factor != runtime_factor
        eager_projection, eager_norm = signed_projection(vectors, rotations, head, rounds, start, half, eager_factor)
        runtime_projection, runtime_norm = signed_projection(
            vectors, rotations, head, rounds, start, half, runtime_factor)
        margin = eager_projection - runtime_projection
        bound = slack * vector_norms * (eager_norm + runtime_norm)
        ratio = torch.where(differs_here, margin.abs() / bound, -1.0)
        take = ratio > worst_ratio
        margins, bounds, worst_ratio = (torch.where(take, margin, margins), torch.where(take, bound, bounds),
                                        torch.where(take, ratio, worst_ratio))
    # A runtime bucket outside the round's range (the padding bucket at a kept position) is no near-tie.
    out_of_range = (runtime_ids >= layer.padding_bucket) | (runtime_ids < 0)
    margins = torch.where(out_of_range, torch.full_like(margins, float("inf")), margins)
    rows = zip(batch.tolist(), head.tolist(), rounds.tolist(), position.tolist(), margins.tolist(), bounds.tolist())
    return [Disagreement(layer_index, *row) for row in rows]


def signed_projection(vectors, rotations, head, rounds, start, half, factor_bucket):
    """The rotated projection a factor's bucket stands for (bucket j < half: column start + j; j >= half:
    the negation of column start + j - half), and that rotation column's norm. All F-long."""
    column = start + factor_bucket % half
    sign = torch.where(factor_bucket < half, 1.0, -1.0).to(vectors.dtype)
    columns = rotations[head, :, rounds, column]  # F, D
    return sign * (vectors * columns).sum(-1), columns.norm(dim=-1)
