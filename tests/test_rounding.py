"""The rounding bound that every float comparison of the suite uses (tests/rounding.py): it holds for sums in
any order, its assumptions about exp, tanh, erf, log and sqrt hold for the libraries of both runtimes, every op
of every tiny model and of the reference is analysed, and it is tight enough to catch a defect of one part in
ten thousand."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

import rounding
from reference import reference_and_ours
from rounding import assert_within, rounding_bound
from tiny_configs import CASES, CASES_BY_NAME, make_inputs

ONNX_IR_VERSION = 9  # onnx's newest IR version is newer than ONNX Runtime reads


def cancelling_terms(generator, n=64):
    """x and w of n terms of size ~1e3 whose dot product is ~1: partial sums are far larger than the result."""
    x = torch.randn(n, generator=generator, dtype=torch.float64) * 1e3
    w = torch.randn(n, generator=generator, dtype=torch.float64)
    w[-1] = (1 - (x[:-1] * w[:-1]).sum()) / x[-1]
    return x.float(), w.float()


def sums_in_orders(x, w):
    """x . w in float32: sequential, reversed, pairwise, in random orders, with every product rounded or fused
    (the products rounded in float64 first, as an FMA does), and by torch's kernel."""
    products = x * w
    fused = (x.double() * w.double())

    def sequential(terms, dtype=torch.float32):
        total = torch.zeros((), dtype=torch.float32)
        for term in terms:
            total = (total.to(dtype) + term.to(dtype)).float()
        return total

    def pairwise(terms):
        while terms.numel() > 1:
            terms = terms[0::2] + terms[1::2] if terms.numel() % 2 == 0 else torch.cat([terms[:1], terms[1:]])
        return terms[0]

    orders = [torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) for seed in range(8)]
    return [sequential(products), sequential(products.flip(0)), pairwise(products), x @ w,
            sequential(fused, torch.float64)] + [sequential(products[order]) for order in orders]


def test_sums_in_any_order_stay_within_the_bound_and_not_within_ulps_of_the_result():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, w = cancelling_terms(generator)
        bound = rounding_bound(torch.matmul, x, w)
        totals = sums_in_orders(x, w)
        for total in totals:
            assert_within(total, totals[0], bound, "two summation orders")
        # The result-relative rule the suite used before fails here: the gaps are many ulps of the sum.
        spread = max(total.item() for total in totals) - min(total.item() for total in totals)
        assert spread > 2 * torch.finfo(torch.float32).eps * abs(totals[0].item())


def onnx_runtime_function(op: str):
    node = helper.make_node(op, ["x"], ["y"])
    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None]) for name in ("x", "y")]
    model = helper.make_model(helper.make_graph([node], op, values[:1], values[1:]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = ONNX_IR_VERSION
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


# op -> (domain sampled, float64 reference, torch's function): the ranges the models reach, and saturation.
FUNCTIONS = {
    "Exp": ((-87.0, 88.0), np.exp, torch.exp),
    "Tanh": ((-9.0, 9.0), np.tanh, torch.tanh),  # past 9, tanh is 1 in float32
    "Erf": ((-4.0, 4.0), np.vectorize(math.erf), torch.erf),
    "Log": ((1e-3, 1e3), np.log, torch.log),
    "Sqrt": ((0.0, 1e4), np.sqrt, torch.sqrt),
}


@pytest.mark.parametrize("op", FUNCTIONS)
def test_transcendental_functions_are_within_the_assumed_ulps(op):
    """Each runtime's function within half of ULPS_TRANSCENDENTAL ulps of the float64 value (ulps of the
    float32 result), so two evaluations are within ULPS_TRANSCENDENTAL. Measured on an Intel Xeon, 4M samples:
    ONNX Runtime's Tanh 5.46 ulps (at 8.48, near saturation), Log 2.5, Exp 0.85, Erf 0.94, Sqrt 0.5; torch's
    all <= 1."""
    (low, high), exact_function, torch_function = FUNCTIONS[op]
    x = np.random.default_rng(0).uniform(low, high, 100_000).astype(np.float32)
    exact = exact_function(x.astype(np.float64))
    ulp = np.spacing(np.abs(exact.astype(np.float32))).astype(np.float64)
    results = {"onnxruntime": onnx_runtime_function(op)(x), "torch": torch_function(torch.from_numpy(x)).numpy()}
    for runtime, got in results.items():
        error = (np.abs(got.astype(np.float64) - exact) / ulp).max()
        assert error <= rounding.ULPS_TRANSCENDENTAL / 2, f"{runtime} {op}: {error:.2f} ulps"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_every_op_of_our_model_and_the_reference_is_analysed(case, tmp_path):
    reference, ours = reference_and_ours(case, tmp_path)
    input_ids, attention_mask = make_inputs(2, case.length)
    for model in (reference, ours):
        sites = rounding.RoundingSites()
        with torch.enable_grad(), sites:
            model(input_ids=input_ids, attention_mask=attention_mask)
        assert not sites.unanalysed and sites.perturbations


def test_a_model_off_by_one_part_in_ten_thousand_fails_the_bound(tmp_path):
    """The bound our model and the reference agree within is small enough that output weights scaled by
    1 + 1e-4 (a wrong weight, not rounding) fall outside it."""
    case = CASES_BY_NAME["lm_mixed"]
    reference, ours = reference_and_ours(case, tmp_path)
    input_ids, attention_mask = make_inputs(2, case.length)
    bound = rounding_bound(lambda ids: ours(ids, attention_mask=attention_mask).logits, input_ids)
    keep = attention_mask.bool()
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).logits
        assert_within(ours(input_ids, attention_mask=attention_mask).logits, expected, bound, "ours", keep)
        ours.lm_head.decoder.weight.mul_(1 + 1e-4)
        with pytest.raises(AssertionError, match="rounding bound"):
            assert_within(ours(input_ids, attention_mask=attention_mask).logits, expected, bound, "off", keep)
