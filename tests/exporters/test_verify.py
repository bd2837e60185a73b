"""The verifier: a passing report, failing reports that carry the numbers and say whether flipped LSH buckets
or a real numeric difference explain them, and the shapes it checks."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import reformer
from exporters.errors import ExportError
from exporters.onnx import export_onnx
from exporters.specs import TASKS
from exporters.verify import default_shapes, onnxruntime_providers, verification_inputs, verify_export
from tiny_configs import CASES_BY_NAME

SPEC = TASKS["causal-lm"]
CASE = CASES_BY_NAME["lm_lsh_factorised"]  # two LSH layers, two hashing rounds, factorised buckets


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**CASE.config_values)).eval()


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("verify") / "model.onnx"
    export_onnx(model, SPEC, path)
    return path


def test_default_shapes_cover_short_odd_and_maximum_lengths_at_batch_one_and_more():
    config = reformer.ReformerConfig(**CASE.config_values)  # chunk length 4, maximum 32
    shapes = default_shapes(config)
    lengths = {length for _, length in shapes}
    assert {1, 3, 32} <= lengths  # 1, below one chunk, the maximum
    assert any(length % config.padding_multiple and length > config.padding_multiple for length in lengths)
    assert {batch for batch, _ in shapes} >= {1, 2}
    assert all(length <= 32 for _, length in shapes)


def test_inputs_pad_the_tail_of_every_row_but_the_first():
    _, attention_mask = verification_inputs(3, 12, vocab_size=30)
    kept = attention_mask.sum(dim=1).tolist()
    assert kept[0] == 12 and kept[1] < 12 and kept[2] < kept[1]
    assert all(attention_mask[row, :kept[row]].all() and not attention_mask[row, kept[row]:].any() for row in range(3))


def test_passing_report(model, onnx_path):
    report = verify_export(model, SPEC, onnx_path, "onnx", runtimes=["onnxruntime-cpu"])
    assert report.passed, report.summary_table()
    assert {row.shape for row in report.rows} == set(default_shapes(model.config))
    for row in report.rows:
        assert (row.runtime, row.device, row.dtype) == ("onnxruntime", "cpu", "fp32")
        assert row.max_abs <= 1e-5 and row.tolerance == 1e-5
        assert row.bucket_agreement == 1.0 and row.total_buckets > 0
    assert json.loads(json.dumps(report.to_dict()))["passed"] is True
    table = report.summary_table()
    assert "onnxruntime" in table and "100.00%" in table and "FAIL" not in table
    assert report.failure_message() == ""


def test_real_difference_is_reported_with_numbers(model, onnx_path):
    """A shifted output bias after export: buckets all agree, so the report calls it a real difference."""
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.lm_head.decoder.bias += 0.5
    report = verify_export(changed, SPEC, onnx_path, "onnx", runtimes=["onnxruntime-cpu"])
    assert not report.passed
    for row in report.rows:
        assert not row.passed and row.max_abs == pytest.approx(0.5, abs=1e-5)
        assert row.bucket_agreement == 1.0
        assert "every bucket agrees" in row.note
    assert "max abs 0.5 > 1e-05" in report.failure_message()


def test_flipped_buckets_are_reported(model, onnx_path):
    """Other rotations in the first LSH layer after export: buckets flip, and the report says so."""
    changed = copy.deepcopy(model)
    rotations = changed.reformer.encoder.layers[0].attention.self_attention.rotations
    rotations.copy_(torch.randn(rotations.shape, generator=torch.Generator().manual_seed(1)))
    report = verify_export(changed, SPEC, onnx_path, "onnx", runtimes=["onnxruntime-cpu"])
    longest = max(report.rows, key=lambda row: row.shape[1])
    assert longest.bucket_agreement < 1.0 and longest.flipped_buckets > 0
    assert not longest.passed
    assert f"{longest.flipped_buckets} of {longest.total_buckets} bucket assignments flipped" in longest.note
    assert "too many for near-ties" in longest.note


def test_tiny_tolerance_fails_with_the_numbers(model, onnx_path):
    report = verify_export(model, SPEC, onnx_path, "onnx", atol=1e-12, shapes=[(2, 13)],
                           runtimes=["onnxruntime-cpu"])
    (row,) = report.rows
    assert not row.passed and 0 < row.max_abs <= 1e-5 and row.tolerance == 1e-12
    assert "every bucket agrees" in row.note


def test_torchscript_report(model, tmp_path):
    """The verifier runs TorchScript files too: a trace of the same wrapper, with its buckets."""
    input_ids, attention_mask = verification_inputs(2, 13, vocab_size=30)
    with torch.no_grad():
        traced = torch.jit.trace(SPEC.wrap(model, with_buckets=True), (input_ids, attention_mask), check_trace=False)
    torch.jit.save(traced, str(tmp_path / "model.pt"))
    report = verify_export(model, SPEC, tmp_path / "model.pt", "torchscript", runtimes=["torchscript-cpu"])
    assert report.passed, report.summary_table()
    assert all(row.runtime == "torchscript" and row.bucket_agreement == 1.0 for row in report.rows)


def test_unknown_format_or_runtime(model, onnx_path):
    with pytest.raises(ExportError, match="unknown format"):
        verify_export(model, SPEC, onnx_path, "tflite")
    with pytest.raises(ExportError, match="unknown runtime torchscript-cpu"):
        verify_export(model, SPEC, onnx_path, "onnx", runtimes=["torchscript-cpu"])


def test_a_listed_cuda_provider_that_cannot_run_is_skipped_not_failed(model, onnx_path):
    if torch.cuda.is_available():
        pytest.skip("a working CUDA provider is checked by the cuda tests")
    assert "CPUExecutionProvider" in onnxruntime_providers()
    report = verify_export(model, SPEC, onnx_path, "onnx", shapes=[(1, 5)])
    assert [row.device for row in report.rows] == ["cpu"]
    if "CUDAExecutionProvider" in onnxruntime_providers():
        assert any(reason.startswith("onnxruntime-cuda:") for reason in report.skipped)


@pytest.mark.cuda
def test_cuda_runtimes(model, onnx_path, tmp_path):
    report = verify_export(model, SPEC, onnx_path, "onnx", device="cuda", runtimes=["onnxruntime-cuda"])
    assert report.rows and report.passed, report.summary_table()
    input_ids, attention_mask = verification_inputs(2, 13, vocab_size=30)
    wrapper = SPEC.wrap(copy.deepcopy(model).cuda(), with_buckets=True)
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, (input_ids.cuda(), attention_mask.cuda()), check_trace=False)
    torch.jit.save(traced, str(tmp_path / "model.pt"))
    report = verify_export(model, SPEC, tmp_path / "model.pt", "torchscript", device="cuda",
                           runtimes=["torchscript-cuda"])
    assert report.rows and report.passed, report.summary_table()
