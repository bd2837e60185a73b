"""The verifier: bucket replay through the verification twin, near-tie certificates, and the verdict.

Two models. `model`, a tiny fp32 LM (two LSH layers, two rounds, factorised buckets), for the report's
protocol. `flipping`, an fp16 LM with four LSH layers at 512 tokens, verified on ONNX Runtime CPU against
eager fp16 on the CPU: there the free-running graph flips ~1% of its bucket assignments and its logits move
by ~0.2 (20 times the fp16 tolerance) although the graph is right, which is what the verifier must tell
apart from planted bugs (each planted after a correct export, so that flips exist as well)."""

from __future__ import annotations

import copy
import json

import onnxscript
import pytest
import torch
from onnxscript import INT64
from onnxscript import opset18 as op

import reformer
from exporters.errors import ExportError
from exporters.ops import registry
from exporters.onnx import export_onnx
from exporters.specs import TASKS
from exporters.torchscript import export_torchscript
from exporters.runners import onnxruntime_providers
from exporters.twin_difference import twin_node_difference
from exporters.verification_failures import CertificateFailure, NoTwinFailure, TwinMismatchFailure, ValuesFailure
from exporters.verification_report import VerificationReport
from exporters.verify import default_shapes, verification_inputs, verify_export
from tiny_configs import CASES_BY_NAME

SPEC = TASKS["causal-lm"]
CASE = CASES_BY_NAME["lm_lsh_factorised"]  # two LSH layers, two hashing rounds, factorised buckets
ONNX_CPU = ["onnxruntime-cpu"]
FLIPPING_LENGTH = 512
FLIPPING_CONFIG = dict(
    hidden_size=64, attention_head_size=32, num_attention_heads=2, feed_forward_size=128, attn_layers=["lsh"] * 4,
    is_decoder=True, num_hashes=2, lsh_attn_chunk_length=16, axial_pos_embds=False,
    max_position_embeddings=FLIPPING_LENGTH, vocab_size=64, hash_seed=1, hidden_dropout_prob=0.0,
    lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
)


def export_with_twin(model, folder, fmt="onnx", with_buckets=True, **options):
    """The graph and its verification twin, as exporters.api writes them; the graph with bucket outputs (to
    count its free-running flips) unless asked for a deployment graph."""
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    path, twin = folder / f"model{suffix}", folder / f"twin{suffix}"
    export = export_onnx if fmt == "onnx" else export_torchscript
    export(model, SPEC, path, with_buckets=with_buckets, **options)
    export(model, SPEC, twin, replay=True, **options)
    return path, twin


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**CASE.config_values)).eval()


@pytest.fixture(scope="module")
def onnx_files(model, tmp_path_factory):
    return export_with_twin(model, tmp_path_factory.mktemp("verify"))


@pytest.fixture(scope="module")
def flipping():
    torch.manual_seed(0)
    return reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**FLIPPING_CONFIG)).eval()


@pytest.fixture(scope="module")
def flipping_files(flipping, tmp_path_factory):
    return export_with_twin(flipping, tmp_path_factory.mktemp("flipping"), dtype="fp16")


def verify_flipping(model, files):
    path, twin = files
    return verify_export(model, SPEC, path, "onnx", twin_path=twin, dtype="fp16", runtimes=ONNX_CPU,
                         shapes=[(2, FLIPPING_LENGTH)])


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


def test_passing_report(model, onnx_files):
    path, twin = onnx_files
    report = verify_export(model, SPEC, path, "onnx", twin_path=twin, runtimes=ONNX_CPU)
    assert report.passed, report.summary_table()
    assert {row.shape for row in report.rows} == set(default_shapes(model.config))
    for row in report.rows:
        assert (row.runtime, row.device, row.dtype, row.replayed) == ("onnxruntime", "cpu", "fp32", True)
        # fp32: 1e-5 of the output scale, at least 1e-5; ONNX Runtime runs the same ops, ~1e-7 apart.
        assert 1e-5 <= row.tolerance and row.replay_max_abs <= row.tolerance and row.max_abs <= row.tolerance
        assert row.total_buckets > 0 and row.flipped_buckets == row.disagreements == 0
    assert json.loads(json.dumps(report.to_dict()))["passed"] is True
    table = report.summary_table()
    assert "onnxruntime" in table and "FAIL" not in table and "verification twin: adds" in table
    assert report.failure_message() == ""


def test_the_twin_differs_from_the_shipped_graph_only_where_the_buckets_come_from(onnx_files, model, tmp_path):
    extra, missing = twin_node_difference(*map(str, onnx_files), "onnx")
    assert not missing  # every node of the shipped graph is in the twin
    # What taking the forced buckets adds: per LSH layer a Gather and a Where, once the positions to gather.
    assert set(extra) <= {"Gather", "Where", "Less", "Reshape", "Range", "Not", "Unsqueeze", "Cast"}
    assert extra["Gather"] == 2 and sum(extra.values()) <= 4 + 2 * 2
    path, twin = export_with_twin(model, tmp_path, "torchscript")
    extra, missing = twin_node_difference(str(path), str(twin), "torchscript")
    assert not missing and extra["aten::index_select"] == 2
    report = VerificationReport("onnx", "model.onnx", twin_missing_nodes={"TopK": 1})
    assert not report.passed and "lacks 1 TopK" in report.failure_message()
    assert report.failures == [TwinMismatchFailure({"TopK": 1})] and report.failures[0].kind == "twin"


def test_a_deployment_graph_without_bucket_outputs_is_certified_through_its_twin(flipping, flipping_files, tmp_path):
    """Without bucket outputs the shipped graph's flips cannot be counted, but its first LSH layer is the
    twin's (same nodes, same input): the verdict is the same, and the report says what it could see."""
    export_onnx(flipping, SPEC, tmp_path / "deployed.onnx", dtype="fp16")
    report = verify_flipping(flipping, (tmp_path / "deployed.onnx", flipping_files[1]))
    (row,) = report.rows
    assert report.passed, report.summary_table()
    assert row.total_buckets == 0 and row.flips == "-" and row.max_abs > row.tolerance
    assert 0 < row.disagreements == row.certified and "certified near-tie" in row.note


def test_torchscript_report(model, tmp_path):
    path, twin = export_with_twin(model, tmp_path, "torchscript")
    report = verify_export(model, SPEC, path, "torchscript", twin_path=twin, runtimes=["torchscript-cpu"])
    assert report.passed, report.summary_table()
    assert all(row.runtime == "torchscript" and row.replay_max_abs == 0 for row in report.rows)


def test_correct_graph_with_many_free_running_flips_passes_and_says_why(flipping, flipping_files):
    report = verify_flipping(flipping, flipping_files)
    (row,) = report.rows
    assert report.passed, report.summary_table()
    # Free-running, outputs alone would condemn the graph: flips cascade far past the fp16 tolerance.
    assert row.flipped_buckets > 20 and row.max_abs > 5 * row.tolerance
    # With eager's buckets forced, the graph is within a few fp16 ulps of eager.
    assert row.replay_max_rel < 2e-3
    assert 0 < row.disagreements == row.certified
    assert abs(row.worst_margin) < 0.1 * row.worst_bound  # real near-ties sit far below the bound
    assert "certified near-tie" in row.note and f"{row.flipped_buckets} of {row.total_buckets}" in row.note


def test_a_perturbed_weight_in_the_last_layer_fails_the_replay(flipping, flipping_files):
    changed = copy.deepcopy(flipping)
    with torch.no_grad():
        changed.reformer.encoder.layers[-1].feed_forward.output.dense.weight[0, 0] += 1.0
    (row,) = verify_flipping(changed, flipping_files).rows
    assert not row.passed and row.flipped_buckets > 0
    assert row.replay_max_abs > row.tolerance
    assert "with eager's buckets in every LSH layer" in row.note
    assert row.failures == [ValuesFailure(row.replay_max_abs, row.tolerance, replayed=True)]


def test_a_wrong_rotation_for_one_head_fails_the_certificate(flipping, flipping_files):
    changed = copy.deepcopy(flipping)
    rotations = changed.reformer.encoder.layers[1].attention.self_attention.rotations
    rotations[1] = torch.randn(rotations[1].shape, generator=torch.Generator().manual_seed(1))
    report = verify_flipping(changed, flipping_files)
    (row,) = report.rows
    assert not row.passed and row.certified < row.disagreements
    assert abs(row.worst_margin) > 2 * row.worst_bound
    assert "LSH layer 1 " in row.worst_disagreement and " head 1 " in row.worst_disagreement
    assert "not near-ties" in report.failure_message()
    assert CertificateFailure(row.disagreements - row.certified, row.disagreements, row.worst_margin, row.worst_bound,
                              row.worst_disagreement) in row.failures


@onnxscript.script(opset=registry.REFORMER_OPSET, default_opset=op)
def reversed_permutation(permutation: INT64) -> INT64:
    """A wrong undo-sort: the permutation's inverse read backwards."""
    length = op.Squeeze(op.Shape(permutation, start=-1))
    positions = op.Range(op.Constant(value_int=0), length, op.Constant(value_int=1))
    positions = op.Expand(positions, op.Shape(permutation))
    inverse = op.ScatterElements(positions, permutation, positions, axis=-1)
    backwards = op.Sub(op.Sub(length, op.Constant(value_int=1)), positions)
    return op.GatherElements(inverse, backwards, axis=-1)


def test_a_wrong_undo_sort_in_the_graph_fails_the_replay(flipping, tmp_path, monkeypatch):
    wrong = registry.CustomOp(name="invert_permutation", onnx_name="InvertPermutation",
                              lowerings={"standard": lambda context: reversed_permutation})
    monkeypatch.setitem(registry.REGISTRY, "invert_permutation", wrong)
    files = export_with_twin(flipping, tmp_path, dtype="fp16")
    (row,) = verify_flipping(flipping, files).rows
    assert not row.passed and row.replay_max_abs > 10 * row.tolerance
    assert "with eager's buckets in every LSH layer" in row.note
    assert ValuesFailure(row.replay_max_abs, row.tolerance, replayed=True) in row.failures


def test_a_tiny_tolerance_fails_with_the_numbers(model, onnx_files):
    path, twin = onnx_files
    report = verify_export(model, SPEC, path, "onnx", twin_path=twin, atol=1e-12, shapes=[(2, 13)],
                           runtimes=ONNX_CPU)
    (row,) = report.rows
    assert not row.passed and 0 < row.replay_max_abs <= 1e-5 and row.tolerance == 1e-12
    assert f"{row.replay_max_abs:.3g} > tolerance 1e-12" in report.failure_message()
    assert row.failures == [ValuesFailure(row.replay_max_abs, 1e-12, replayed=True)]


def test_lsh_layers_without_a_twin_fail_saying_so(model, onnx_files):
    report = verify_export(model, SPEC, onnx_files[0], "onnx", shapes=[(1, 5)], runtimes=ONNX_CPU)
    assert not report.passed and "no verification twin" in report.rows[0].note
    assert report.rows[0].failures == [NoTwinFailure(lsh_layers=2)]


def test_a_model_without_lsh_layers_needs_no_twin(tmp_path):
    model = reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**CASES_BY_NAME["lm_local_short"].config_values))
    export_onnx(model.eval(), SPEC, tmp_path / "local.onnx")
    report = verify_export(model, SPEC, tmp_path / "local.onnx", "onnx", runtimes=ONNX_CPU)
    assert report.passed, report.summary_table()
    assert all(not row.replayed and row.replay_max_abs == row.max_abs for row in report.rows)


def test_unknown_format_or_runtime(model, onnx_files):
    with pytest.raises(ExportError, match="unknown format"):
        verify_export(model, SPEC, onnx_files[0], "tflite")
    with pytest.raises(ExportError, match="unknown runtime torchscript-cpu"):
        verify_export(model, SPEC, onnx_files[0], "onnx", runtimes=["torchscript-cpu"])


def test_a_listed_cuda_provider_that_cannot_run_is_skipped_not_failed(model, onnx_files):
    if torch.cuda.is_available():
        pytest.skip("a working CUDA provider is checked by the cuda tests")
    assert "CPUExecutionProvider" in onnxruntime_providers()
    report = verify_export(model, SPEC, onnx_files[0], "onnx", twin_path=onnx_files[1], shapes=[(1, 5)])
    assert [row.device for row in report.rows] == ["cpu"]
    if "CUDAExecutionProvider" in onnxruntime_providers():
        assert any(reason.startswith("onnxruntime-cuda:") for reason in report.skipped)


@pytest.mark.cuda
@pytest.mark.parametrize("tf32", [False, True])
def test_cuda_runtimes(model, onnx_files, tmp_path, tf32):
    report = verify_export(model, SPEC, onnx_files[0], "onnx", twin_path=onnx_files[1], device="cuda", tf32=tf32,
                           runtimes=["onnxruntime-cuda"])
    assert report.rows and report.passed, report.summary_table()
    path, twin = export_with_twin(model, tmp_path, "torchscript", device="cuda")
    report = verify_export(model, SPEC, path, "torchscript", twin_path=twin, device="cuda", tf32=tf32,
                           runtimes=["torchscript-cuda"])
    assert report.rows and report.passed, report.summary_table()
