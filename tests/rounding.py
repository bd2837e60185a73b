"""How far two float evaluations of one computation may drift apart: a first-order rounding bound, the
tolerance of every comparison of float outputs in this suite.

Two correct implementations of the same math (eager PyTorch, ONNX Runtime, Inductor, TorchScript, the
`transformers` reference, on any x86-64 processor) differ only in how they round: matrix kernels sum in other
orders (block sizes, FMA, AVX-512 or AVX2, thread splits), runtimes fuse elementwise ops, and exp or erf come
from other libraries. The analysis is the standard one (Higham, "Accuracy and Stability of Numerical
Algorithms", ch. 3):

- A sum of n terms, in any order and with or without FMA, is within gamma_n * sum|terms| of the exact sum,
  gamma_n = n u / (1 - n u), u = eps / 2: relative to the terms' magnitudes, not to the sum, because terms
  may cancel. Two evaluations are within twice that of each other: `gamma(n)` * sum|terms| below.
- Each op that rounds is a site with a local bound on the gap between two evaluations of it (the list below).
  A gap travels to the outputs through the rest of the computation; to first order (dropped terms are of order
  (n eps)^2, 1e-10 relative in fp32) the outputs move by at most the sum over sites of
  |d output / d site| * local bound. `rounding_bound` adds a zero perturbation at every site and takes those
  derivatives by autograd for every output element, so the bound follows the real weights and inputs: masked
  scores (whose huge rounding has zero derivative), softmax saturation, layer norm gains, cancellation.
- The `transformers` reference is another program for the same math: the same products and reductions of the
  same values, in another arrangement (exp of scores minus their log-sum-exp where we take a softmax). Each
  evaluation is within half the bound of the exact result; the reference's own bound cannot be taken (its
  reversible layers' backward refuses to run in eval mode), so ours stands for both.

Local bounds on the gap between two evaluations, eps the op's dtype's epsilon, c = ULPS_TRANSCENDENTAL:
- products (linear, matmul, bmm, einsum): gamma(n) (|a| @ |b| + |bias|), n the contraction length (+1 with a
  bias).
- sums and means: gamma(n) sum|x| (a mean over n).
- softmax: gamma(n + c + 1) p (positive terms: the normaliser's error is relative to itself), plus
  min(eps |lse|, lse - max) p for the reference's exp(x - logsumexp(x)): its log-sum-exp, max + log(sum
  exp(x - max)), rounds at its own magnitude, which a softmax never forms (LSH's rounds at the self-mask,
  x = -1e5 twice: 0.0022 off in fp32), unless the log is below that rounding (a row one key dominates).
- logsumexp: gamma(n + c) + (c + 1) eps |out|.
- layer_norm: |gamma_weight| (gamma(n) mean|x| / sigma + (n / 2 + 5) eps |x_hat|) + eps |beta| (mean, centring,
  the variance's positive sum, sqrt, division, scale and shift each round).
- vector_norm: gamma(n + 3) / 2 |out| (a positive sum of squares under a square root).
- cross_entropy, mse_loss: the log-sum-exp and subtraction per row, then the mean (see `loss_bound`).
- exp, log, tanh, erf, sigmoid, silu, sqrt, rsqrt, pow: c eps |out|; gelu: c eps (|out| + |x| / 2), as it is
  x (1 + erf(x / sqrt 2)) / 2 (or with tanh), whose 1 + erf cancels for negative x. The libraries these runtimes use
  (SLEEF and glibc for torch, MLAS for ONNX Runtime) differ: torch's are within 1 ulp of the float64 value,
  ONNX Runtime's Tanh within 5.5 (near saturation), its Log 2.5, Exp and Erf 1 (tests/test_rounding.py
  measures them). c = 12: two evaluations, each within 6.
- add, sub: eps (|a| + |b|); mul, div, a cast that narrows: eps |out|. Exact in IEEE arithmetic when both
  sides run them as written, but a runtime may fuse them (FMA, a folded scale, a reassociated a + b + c) or
  skip the narrowing cast.
Ops that do not round (views, gathers, concatenation, selects, masks, casts that widen, max and min,
comparisons, indices, the reference's random rotations) are listed in EXACT. Any other op that returns a float
makes `rounding_bound` fail, so a new op cannot slip past the analysis.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

ULPS_TRANSCENDENTAL = 12
# Output elements whose derivatives one batched backward pass takes.
COTANGENTS_PER_PASS = 512
# Where set, every comparison appends its largest gap and gap / bound to this file, one JSON line each
# (benchmarks/kernel_sweep.py compares them across kernel and thread settings).
REPORT_VARIABLE = "ROUNDING_REPORT"

PRODUCTS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
SUMS = {torch.sum, torch.Tensor.sum, torch.mean, torch.Tensor.mean}
SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax}
LOGSUMEXP = {torch.logsumexp, torch.Tensor.logsumexp}
TRANSCENDENTAL = {torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.tanh, torch.Tensor.tanh,
                  torch.erf, torch.Tensor.erf, torch.sigmoid, torch.Tensor.sigmoid, F.silu,
                  torch.sqrt, torch.Tensor.sqrt, torch.rsqrt, torch.Tensor.rsqrt, torch.pow, torch.Tensor.pow,
                  torch.Tensor.__pow__, torch.square, torch.Tensor.square}
CASTS = {torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.type_as}
ADDITIONS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.sub,
             torch.Tensor.sub, torch.Tensor.__sub__, torch.Tensor.__rsub__}
MULTIPLICATIONS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.div,
                   torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.__rtruediv__}
IN_PLACE = {torch.Tensor.add_: torch.Tensor.add, torch.Tensor.sub_: torch.Tensor.sub,
            torch.Tensor.mul_: torch.Tensor.mul, torch.Tensor.div_: torch.Tensor.div}
# Ops that do not round, as our model and the reference call them (dropout only in eval, the identity there;
# detach, which cuts the derivatives, only where hashing reads the vectors, whose buckets are compared exactly).
EXACT = {
    torch.Tensor.__getitem__, torch.Tensor.detach, torch.Tensor.expand, torch.Tensor.expand_as,
    torch.Tensor.flatten, torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.permute,
    torch.Tensor.transpose, torch.Tensor.squeeze, torch.Tensor.unsqueeze, torch.Tensor.contiguous,
    torch.Tensor.repeat, torch.Tensor.index_select, torch.index_select, torch.Tensor.neg, torch.Tensor.__neg__,
    torch.Tensor.clone, torch.Tensor.split, torch.Tensor.movedim, torch.amax, torch.amin, torch.Tensor.amax,
    torch.Tensor.amin, torch.cat, torch.stack, torch.block_diag, torch.where, torch.gather, torch.Tensor.gather,
    torch.Tensor.masked_fill, torch.tensor, torch.randn, F.dropout, F.embedding, F.relu, torch.relu, F.pad,
}


def gamma(n: int, dtype: torch.dtype) -> float:
    """The gap between two evaluations of an n-term sum, per unit of sum|terms|: 2 gamma_n = n eps / (1 - n u)."""
    eps = torch.finfo(dtype).eps
    return n * eps / (1 - n * eps / 2)


def magnitude(x) -> torch.Tensor | float:
    return x.detach().abs() if isinstance(x, torch.Tensor) else abs(x)


def argument(args, kwargs, index: int, name: str, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


def reduced_count(x: torch.Tensor, dim) -> int:
    if dim is None:
        return x.numel()
    return math.prod(x.shape[d] for d in ([dim] if isinstance(dim, int) else dim))


def product_bound(func, args, kwargs, dtype):
    if func is F.linear:
        x, weight, bias = args[0], args[1], argument(args, kwargs, 2, "bias")
        terms = magnitude(x) @ magnitude(weight).T
        if bias is None:
            return gamma(x.shape[-1], dtype) * terms
        return gamma(x.shape[-1] + 1, dtype) * (terms + magnitude(bias))
    return gamma(args[0].shape[-1], dtype) * (magnitude(args[0]) @ magnitude(args[1]))


def einsum_bound(args, dtype):
    equation, *operands = args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    inputs, result = equation.replace(" ", "").split("->")
    sizes = {letter: size for term, x in zip(inputs.split(","), operands) for letter, size in zip(term, x.shape)}
    n = math.prod(size for letter, size in sizes.items() if letter not in result)
    return gamma(n, dtype) * torch.einsum(equation, *(magnitude(x) for x in operands))


def layer_norm_bound(args, kwargs, dtype):
    x, shape = args[0].detach(), args[1]
    weight, bias = argument(args, kwargs, 2, "weight"), argument(args, kwargs, 3, "bias")
    epsilon = argument(args, kwargs, 4, "eps", 1e-5)
    dims, n, eps = tuple(range(-len(shape), 0)), math.prod(shape), torch.finfo(dtype).eps
    sigma = torch.sqrt(x.var(dim=dims, unbiased=False, keepdim=True) + epsilon)
    normalized = (x - x.mean(dim=dims, keepdim=True)) / sigma
    centring = gamma(n, dtype) * x.abs().mean(dim=dims, keepdim=True) / sigma
    bound = (1.0 if weight is None else magnitude(weight)) * (centring + (n / 2 + 5) * eps * normalized.abs())
    return bound if bias is None else bound + eps * magnitude(bias)


def loss_bound(func, args, kwargs, out):
    """Mean losses: each kept row's log-sum-exp (cross entropy) or squared difference (mse), its subtraction,
    then the mean of m rows."""
    x, target, dtype = args[0].detach(), args[1], out.dtype
    eps, c = torch.finfo(dtype).eps, ULPS_TRANSCENDENTAL
    if func is F.mse_loss:
        difference = (x - target).abs()
        rows = 2 * difference * eps * (x.abs() + target.abs()) + eps * difference.square()
        return gamma(rows.numel(), dtype) * magnitude(out) + rows.mean()
    ignore_index = kwargs.get("ignore_index", -100)
    kept = target != ignore_index
    per_row = F.cross_entropy(x, target, reduction="none", ignore_index=ignore_index)
    lse = torch.logsumexp(x, dim=1)
    rows = gamma(x.shape[1] + c, dtype) + (c + 1) * eps * lse.abs() + eps * per_row
    return gamma(int(kept.sum()) + 1, dtype) * magnitude(out) + rows[kept].mean()


def softmax_bound(args, kwargs, out):
    """gamma(n + c + 1) p and the reference's log-sum-exp rounding (see the module's docstring); a row of -inf
    only (NaN in either arrangement) adds nothing."""
    x, dim = args[0].detach().double(), argument(args, kwargs, 1, "dim")
    eps, n = torch.finfo(out.dtype).eps, x.shape[dim]
    lse = torch.logsumexp(x, dim, keepdim=True)
    lse_rounding = torch.minimum(eps * lse.abs(), lse - x.amax(dim, keepdim=True)).nan_to_num(0.0)
    return (gamma(n + ULPS_TRANSCENDENTAL + 1, out.dtype) + lse_rounding) * magnitude(out)


def local_bound(func, args, kwargs, out: torch.Tensor):
    """The gap two evaluations of this op may have, element by element (None: the op does not round)."""
    dtype, eps, c = out.dtype, torch.finfo(out.dtype).eps, ULPS_TRANSCENDENTAL
    if func in PRODUCTS:
        return product_bound(func, args, kwargs, dtype)
    if func is torch.einsum:
        return einsum_bound(args, dtype)
    if func in SUMS:
        n = reduced_count(args[0], argument(args, kwargs, 1, "dim"))
        return gamma(n, dtype) * func(magnitude(args[0]), *args[1:], **kwargs)
    if func in SOFTMAX:
        return softmax_bound(args, kwargs, out)
    if func in LOGSUMEXP:
        n = reduced_count(args[0], argument(args, kwargs, 1, "dim"))
        return gamma(n + c, dtype) + (c + 1) * eps * magnitude(out)
    if func is F.layer_norm:
        return layer_norm_bound(args, kwargs, dtype)
    if func is torch.linalg.vector_norm:
        return gamma(reduced_count(args[0], argument(args, kwargs, 2, "dim")) + 3, dtype) / 2 * magnitude(out)
    if func in (F.cross_entropy, F.mse_loss):
        return loss_bound(func, args, kwargs, out)
    if func in TRANSCENDENTAL:
        return c * eps * magnitude(out)
    if func is F.gelu:
        return c * eps * (magnitude(out) + magnitude(args[0]) / 2)
    if func in CASTS:
        source = args[0].dtype
        narrows = source.is_floating_point and torch.finfo(source).eps < eps
        return eps * magnitude(out) if narrows else None
    if func in ADDITIONS:
        return eps * (magnitude(args[0]) + magnitude(args[1]))
    if func in MULTIPLICATIONS:
        return eps * magnitude(out)
    return None


class RoundingSites(TorchFunctionMode):
    """Adds a zero perturbation, which autograd follows, to the float output of every op that rounds, and keeps
    its local bound; collects the float-returning ops that are neither sites nor EXACT."""

    def __init__(self):
        super().__init__()
        self.perturbations: list[torch.Tensor] = []
        self.bounds: list[torch.Tensor] = []
        self.unanalysed: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = magnitude(args[0]).clone() if func in IN_PLACE else None  # the in-place op overwrites it
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
            return out
        if func in IN_PLACE:
            bound = local_bound(IN_PLACE[func], (before, *args[1:]), kwargs, out)
        else:
            bound = local_bound(func, args, kwargs, out)
        if bound is None:
            if func not in EXACT and func not in CASTS:
                self.unanalysed.add(getattr(func, "__qualname__", str(func)))
            return out
        perturbation = torch.zeros_like(out, requires_grad=True)
        self.perturbations.append(perturbation)
        self.bounds.append(torch.as_tensor(bound, dtype=torch.float64).expand(out.shape))
        return out.add_(perturbation) if func in IN_PLACE else out + perturbation


def rounding_bound(function, *inputs):
    """The first-order bound on the gap between two evaluations of `function(*inputs)` that round differently,
    element by element (float64) for each float tensor it returns, in the same structure: a tensor for a
    tensor, a list for a sequence (None where an entry is not a float tensor), a dict of fields for a model
    output."""
    sites = RoundingSites()
    with torch.enable_grad(), sites:
        returned = function(*inputs)
    assert not sites.unanalysed, f"ops with no rounding analysis: {sorted(sites.unanalysed)}"

    def bound(x):
        return bound_of(x, sites) if isinstance(x, torch.Tensor) and x.dtype.is_floating_point else None

    if isinstance(returned, torch.Tensor):
        return bound(returned)
    if isinstance(returned, (list, tuple)):
        return [bound(x) for x in returned]
    return {name: bound(x) for name, x in vars(returned).items()}


def bound_of(output: torch.Tensor, sites: RoundingSites) -> torch.Tensor:
    flat = output.reshape(-1)
    if not flat.requires_grad:  # no site reaches it
        return torch.zeros(output.shape, dtype=torch.float64)
    pieces = []
    for start in range(0, flat.numel(), COTANGENTS_PER_PASS):
        count = min(COTANGENTS_PER_PASS, flat.numel() - start)
        cotangents = torch.zeros(count, flat.numel(), dtype=flat.dtype)
        cotangents[:, start:start + count] = torch.eye(count, dtype=flat.dtype)
        grads = torch.autograd.grad(flat, sites.perturbations, cotangents, retain_graph=True, allow_unused=True,
                                    is_grads_batched=True)
        piece = torch.zeros(count, dtype=torch.float64)
        for grad, bound in zip(grads, sites.bounds):
            if grad is not None:
                piece += (grad.double().abs() * bound).reshape(count, -1).sum(1)
        pieces.append(piece)
    return torch.cat(pieces).view(output.shape)


def assert_within(got, want, bound: torch.Tensor, label: str = "", keep: torch.Tensor | None = None) -> None:
    """|got - want| <= bound element by element (at `keep`, a mask over the leading axes, where given); the
    message names the worst element's gap and its bound."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert got.shape == want.shape == bound.shape, f"{label}: shapes {got.shape}, {want.shape}, {bound.shape}"
    if keep is not None:
        got, want, bound = got[keep], want[keep], bound[keep]
    gap = (got - want).abs()
    excess = gap - bound
    worst = int(excess.argmax()) if excess.numel() else 0
    if os.environ.get(REPORT_VARIABLE) and gap.numel():
        record_comparison(label, gap, bound)
    assert not (excess > 0).any(), (f"{label}: gap {gap.flatten()[worst].item():.3g} > rounding bound "
                                    f"{bound.flatten()[worst].item():.3g} (max gap {gap.max().item():.3g})")


def record_comparison(label: str, gap: torch.Tensor, bound: torch.Tensor) -> None:
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    ratio = torch.where(gap > 0, gap / bound, torch.zeros_like(gap)).max().item()
    with open(os.environ[REPORT_VARIABLE], "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"test": test, "label": label, "gap": gap.max().item(), "ratio": ratio}) + "\n")
