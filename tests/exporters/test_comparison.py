"""The comparison steps the task graphs' and the decoder's verification share (exporters.comparison), on graphs
stood in for by runners: each check fails the row with its typed failure (exporters.verification_failures),
whose message is the row's note and the report's one-line failure message. The planted defects in exported
graphs are in tests/exporters/test_verify.py, test_decoder.py and test_quantize.py."""

from __future__ import annotations

import json
import math

import torch

from exporters.comparison import judged_failures, mark_as_information, run_checked
from exporters.runners import Runner
from exporters.verification_failures import (
    CertificateFailure,
    CountFailure,
    NamesFailure,
    RuntimeFailure,
    ShapesFailure,
    ValuesFailure,
)
from exporters.verification_report import VerificationReport, VerificationRow

EAGER = [torch.zeros(1, 3, 5)]  # eager's logits


def row() -> VerificationRow:
    return VerificationRow("onnxruntime", "cpu", (1, 3), "fp32")


def run_graph(outputs, output_names=None, names=("logits",), buckets_optional=False):
    """run_checked over a runner returning `outputs` (or raising them); (its result, the row)."""

    def run(inputs):
        if isinstance(outputs, Exception):
            raise outputs
        return outputs

    checked = row()
    runner = Runner(run, "cpu", output_names, prepared_call=lambda inputs: lambda: run(inputs))
    return run_checked(runner, [], list(names), EAGER, checked, buckets_optional), checked


def test_a_runtime_error_fails_the_row_with_its_first_line():
    outputs, checked = run_graph(RuntimeError("\nno kernel for this shape\nstack trace"))
    assert outputs is None and not checked.passed
    assert checked.failures == [RuntimeFailure("no kernel for this shape")]
    assert checked.failures[0].kind == "runtime" and checked.note == "runtime error: no kernel for this shape"


def test_other_output_names_fail_the_row():
    outputs, checked = run_graph([torch.zeros(1, 3, 5)], output_names=["scores"])
    assert outputs is None and checked.failures == [NamesFailure(["scores"], ["logits"])]
    assert checked.failures[0].kind == "names"
    assert checked.note == "the graph's outputs are ['scores'], the spec's ['logits']"


def test_another_number_of_outputs_fails_the_row():
    outputs, checked = run_graph([torch.zeros(1, 3, 5)] * 2)
    assert outputs is None and checked.failures == [CountFailure(2, 1)]
    assert checked.failures[0].kind == "names" and checked.note == "the graph returns 2 outputs, the spec names 1"


def test_another_shape_fails_the_row():
    outputs, checked = run_graph([torch.zeros(1, 3, 4)])
    assert outputs is None and checked.failures == [ShapesFailure("logits", (1, 3, 4), (1, 3, 5))]
    assert checked.failures[0].kind == "shapes" and checked.note == "logits has shape (1, 3, 4), eager (1, 3, 5)"


def test_a_deployment_graph_may_leave_its_bucket_outputs_out():
    outputs, checked = run_graph([torch.zeros(1, 3, 5)], output_names=["logits"], names=("logits", "buckets_0"),
                                 buckets_optional=True)
    assert outputs is not None and checked.failures == []


def judged(**numbers) -> VerificationRow:
    compared = VerificationRow("onnxruntime", "cpu", (2, 8), "fp32", tolerance=1e-5, replay_max_abs=0.0, max_abs=0.0,
                               replayed=True)
    for name, value in numbers.items():
        setattr(compared, name, value)
    compared.conclude(judged_failures(compared), "information")
    return compared


def test_every_reason_a_row_fails_is_a_failure_in_its_note():
    failed = judged(replay_max_abs=0.5, disagreements=3, certified=1, worst_margin=0.2, worst_bound=0.01,
                    worst_disagreement="LSH layer 0 head 1")
    assert not failed.passed and [failure.kind for failure in failed.failures] == ["values", "certificate"]
    assert failed.failures == [ValuesFailure(0.5, 1e-5, replayed=True),
                               CertificateFailure(2, 3, 0.2, 0.01, "LSH layer 0 head 1")]
    assert failed.note == ("replayed outputs differ by 0.5 > tolerance 1e-05 with eager's buckets in every LSH layer: "
                           "the graph computes something else; 2 of 3 bucket disagreements are not near-ties, the "
                           "graph hashes differently; worst: LSH layer 0 head 1")
    passed = judged(replay_max_abs=1e-6)
    assert passed.passed and passed.failures == [] and passed.note == "information"


def test_nan_fails_even_a_quantized_row():
    nan = judged(max_abs=math.nan)
    assert not nan.passed and nan.note == "runtime output holds NaN" and nan.failures[0].kind == "values"
    quantized = judged(replay_max_abs=0.5, disagreements=3)
    mark_as_information(quantized, "prefill and 3 greedy steps")
    assert quantized.passed and quantized.dtype == "int8" and quantized.note == "prefill and 3 greedy steps"
    quantized.max_abs = math.nan
    mark_as_information(quantized)
    assert not quantized.passed and quantized.note == "runtime output holds NaN"


def test_the_failure_message_and_json_report_come_from_the_failures():
    report = VerificationReport("onnx", "model.onnx", rows=[judged(replay_max_abs=1e-6), judged(replay_max_abs=0.5)])
    assert report.failure_message() == (
        "1 of 2 checks failed; worst: onnxruntime cpu 2x8 fp32: replayed outputs differ by 0.5 > tolerance 1e-05 "
        "with eager's buckets in every LSH layer: the graph computes something else")
    rows = json.loads(json.dumps(report.to_dict()))["rows"]
    assert rows[0]["failures"] == [] and rows[1]["failures"] == [{
        "kind": "values", "max_abs": 0.5, "tolerance": 1e-5, "replayed": True, "message": report.rows[1].note}]
