"""The ONNX exporter, checked in ONNX Runtime (CPU) against eager PyTorch and the `transformers` reference.

Acceptance 1: for every task, on six configs covering all five model classes, the graph exported at batch 2
and one length matches eager at other batch sizes and lengths (1 to the maximum, odd ones), with padded
masks: within the first-order rounding bound of eager's computation, element by element (tests/rounding.py;
both run the same ops, only kernel rounding differs) at the positions the mask keeps (masked positions are
undefined, see tests/reformer/test_parity.py), buckets identical there.
Acceptance 2: a checkpoint written by `transformers`' save_pretrained, exported, against the reference's eager
output with the same hash_seed: within the same bound (the graph, our model and the reference each evaluate
the same math within half of it)."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import reformer
from exporters import ops
from exporters.errors import ExportError
from exporters.onnx import METADATA_PREFIX, export_onnx
from exporters.specs import MODEL_CLASS_TO_TASK, TASKS
from exporters.verify import verify_export
from graph_checks import assert_graph_matches_eager
from reference import reference_and_ours
from rounding import assert_within, rounding_bound
from tiny_configs import CASES_BY_NAME, build, make_inputs, output_names, per_position, task_configs
# Six configs, all five model classes: mixed and LSH-only layers, factorised buckets, chunks after > 0,
# 1 to 3 hashing rounds, axial and plain position embeddings.
CASE_NAMES = ["lm_mixed", "lm_lsh_factorised", "mlm_lsh_after", "base_lsh_before_after", "seqcls_mixed", "qa_mixed"]
# (batch, length): none is the export's (2, 2 * padding multiple + 1); maximum length 32 for every case.
SHAPES = [(1, 1), (3, 3), (1, 7), (4, 13), (3, 32)]


TASK_PARAMS = [(task, name, values) for task in TASKS for name, values in task_configs(task)]


def session_for(path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(session, input_ids, attention_mask) -> list[np.ndarray]:
    return session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})


def assert_kept_within(model_class, name, got, want, bound, attention_mask, label) -> None:
    """Within the rounding bound at the positions the mask keeps (everywhere for per-sequence outputs)."""
    assert_within(got, want, bound, label, attention_mask.bool() if per_position(model_class, name) else None)


@pytest.fixture(scope="module", params=CASE_NAMES)
def exported(request, tmp_path_factory):
    """(case, reference, ours, path): our model loaded from the reference's save_pretrained, exported."""
    case = CASES_BY_NAME[request.param]
    directory = tmp_path_factory.mktemp(case.name)
    reference, ours = reference_and_ours(case, directory / "checkpoint")
    path = directory / "model.onnx"
    export_onnx(ours, TASKS[MODEL_CLASS_TO_TASK[case.model_class]], path, with_buckets=True)
    return case, reference, ours, path


def outputs_match_at_other_shapes(model_class, eager, session):
    """At each of SHAPES, check the task outputs of `session` against `eager` (an ExportWrapper) within the
    rounding bound at the positions the mask keeps; yields (expected, actual, attention_mask) for further
    checks."""
    for batch, length in SHAPES:
        input_ids, attention_mask = make_inputs(batch, length, seed=length)
        with torch.no_grad():
            expected = eager(input_ids, attention_mask)
        actual = run(session, input_ids, attention_mask)
        bounds = rounding_bound(eager, input_ids, attention_mask)
        for name, want, got, bound in zip(output_names(model_class), expected, actual, bounds):
            assert_kept_within(model_class, name, got, want, bound, attention_mask, f"{name} at {batch}x{length}")
        yield expected, actual, attention_mask


def test_matches_eager_at_other_shapes(exported):
    case, _, ours, path = exported
    spec = TASKS[MODEL_CLASS_TO_TASK[case.model_class]]
    wrapper = spec.wrap(ours, with_buckets=True)
    session = session_for(path)
    names = [output.name for output in session.get_outputs()]
    lsh_layers = ours.config.attn_layers.count("lsh")
    assert names == spec.all_output_names(lsh_layers, with_buckets=True)
    for expected, actual, attention_mask in outputs_match_at_other_shapes(case.model_class, wrapper, session):
        keep = attention_mask.bool()[:, None, None, :]
        for want, got in zip(expected[len(spec.output_names):], actual[len(spec.output_names):]):
            assert torch.equal(torch.from_numpy(got)[keep.expand_as(want)], want[keep.expand_as(want)])


@pytest.mark.parametrize("task,name,values", TASK_PARAMS, ids=[f"{task}-{name}" for task, name, _ in TASK_PARAMS])
def test_every_task_matches_eager_at_other_shapes(task, name, values, tmp_path):
    """Each task's head on CONFIGS_PER_TASK configs (the table's configs, made causal or bidirectional as
    the task needs), exported once, at shapes other than the export's; outputs and buckets."""
    spec, model = TASKS[task], build(task, values)
    path = tmp_path / "model.onnx"
    export_onnx(model, spec, path, with_buckets=True)
    assert_graph_matches_eager(spec, model, "onnx", path, SHAPES)


def test_local_attention_with_chunk_length_1_matches_eager(tmp_path):
    """Chunk length 1 pads nothing, so the padded length may be 1: torch.export once guarded it against 1 where
    merging the heads reshaped a transposed tensor (reformer.attention.chunking.transposed_copy), and refused the
    export of local attention with more than one head. Found by tests/test_properties.py, at head size 1."""
    values = dict(CASES_BY_NAME["lm_local_short"].config_values, local_attn_chunk_length=1, local_num_chunks_before=0,
                  attention_head_size=1)
    model = build("base", values)
    path = tmp_path / "model.onnx"
    export_onnx(model, TASKS["base"], path, with_buckets=True)
    assert_graph_matches_eager(TASKS["base"], model, "onnx", path, SHAPES)


def test_matches_transformers_reference(exported):
    case, reference, ours, path = exported
    session = session_for(path)
    for batch in (1, 2):
        input_ids, attention_mask = make_inputs(batch, case.length)
        with torch.no_grad():
            expected = reference(input_ids=input_ids, attention_mask=attention_mask)
        actual = run(session, input_ids, attention_mask)
        bounds = rounding_bound(lambda: ours(input_ids=input_ids, attention_mask=attention_mask))
        for name, got in zip(output_names(case.model_class), actual):
            assert_kept_within(case.model_class, name, got, getattr(expected, name), bounds[name], attention_mask,
                               f"{name} at batch {batch}")


def test_metadata_and_custom_op_nodes(exported):
    case, _, ours, path = exported
    model = onnx.load(str(path))
    metadata = {prop.key[len(METADATA_PREFIX):]: json.loads(prop.value) for prop in model.metadata_props
                if prop.key.startswith(METADATA_PREFIX)}
    assert metadata["hash_seed"] == 3 and metadata["hash_seed_defaulted"] is False
    assert metadata["task"] == MODEL_CLASS_TO_TASK[case.model_class]
    assert metadata["num_buckets"] == ours.config.num_buckets and metadata["num_buckets_defaulted"] is False
    assert metadata["max_length"] == 32 and metadata["padding_multiple"] == ours.config.padding_multiple
    assert (metadata["opset"], metadata["custom_ops"], metadata["dtype"]) == (18, "auto", "fp32")
    # auto picks the ort lowerings: the bucket sort stays a custom-domain node with its model-local function.
    assert metadata["lowerings"]["sort_by_bucket"] == "ort"
    assert [node.op_type for node in model.graph.node if node.domain == ops.DOMAIN] == ["BucketArgsort"] * len(
        [kind for kind in ours.config.attn_layers if kind == "lsh"])
    assert [function.name for function in model.functions] == ["BucketArgsort"]


def test_axial_positions_are_stored_per_axis(exported):
    """The graph keeps each axis's table, not the full table of every position (which the exporter would fold
    into a constant shaped [*axial_pos_shape, width], max_length x hidden values in all)."""
    _, _, ours, path = exported
    shapes = [list(tensor.dims) for tensor in onnx.load(str(path)).graph.initializer]
    axial_shape = ours.config.axial_pos_shape if ours.config.axial_pos_embds else None
    assert not [shape for shape in shapes if shape[:-1] == axial_shape]


@pytest.mark.parametrize("name", ["lm_mixed", "base_local_wide"])
def test_fused_attention_lowering_matches_eager(name, tmp_path):
    """custom_ops="ort" writes chunked attention as ONNX Runtime's MultiHeadAttention in local layers and in LSH
    layers with one hashing round (both cases here: every layer; several rounds have their own op, see
    test_fused_lowerings_of_several_hashing_rounds_pass_verification); outputs and buckets match eager at
    shapes other than the export's, within the tolerance of the standard graph."""
    case = CASES_BY_NAME[name]
    torch.manual_seed(0)
    model = getattr(reformer, case.model_class)(reformer.ReformerConfig(**case.config_values)).eval()
    assert model.config.num_hashes == 1
    spec = TASKS[MODEL_CLASS_TO_TASK[case.model_class]]
    path = tmp_path / "model.onnx"
    export_onnx(model, spec, path, custom_ops="ort", with_buckets=True)
    proto = onnx.load(str(path))
    custom_nodes = [node.op_type for node in proto.graph.node if node.domain == ops.DOMAIN]
    assert custom_nodes.count("Attend") == len(model.config.attn_layers)
    compared = list(outputs_match_at_other_shapes(case.model_class, spec.wrap(model, with_buckets=True),
                                                  session_for(path)))
    assert len(compared) == len(SHAPES)


# Fused op per lowering: the kept custom-domain node (ort), or the standard op it inlines to (onnx-attention).
FUSED_LOWERINGS = {"ort": (18, ops.DOMAIN, "AttendWithLogNormalizer"), "onnx-attention": (23, "", "Attention")}


@pytest.mark.parametrize("custom_ops", FUSED_LOWERINGS)
# mlm_mixed_4_hashes (bidirectional, 4 rounds) with the slow tests: the default run checks both lowerings on
# lm_lsh_factorised (causal, 2 rounds, factorised buckets), and each config costs about 20 s per lowering.
@pytest.mark.parametrize("name", ["lm_lsh_factorised", pytest.param("mlm_mixed_4_hashes", marks=pytest.mark.slow)])
def test_fused_lowerings_of_several_hashing_rounds_pass_verification(custom_ops, name, tmp_path):
    """LSH layers with several hashing rounds (2, and 4 beside a local layer) under each fused lowering: the
    graph holds one fused attention per attention layer, and the verifier (the twin's replay of eager's buckets,
    then the free-running graph) passes."""
    from exporters.verify import verify_export

    opset, domain, fused_op = FUSED_LOWERINGS[custom_ops]
    case = CASES_BY_NAME[name]
    torch.manual_seed(0)
    model = getattr(reformer, case.model_class)(reformer.ReformerConfig(**case.config_values)).eval()
    assert model.config.num_hashes > 1
    spec = TASKS[MODEL_CLASS_TO_TASK[case.model_class]]
    path, twin = tmp_path / "model.onnx", tmp_path / "twin.onnx"
    for target, replay in ((path, False), (twin, True)):
        export_onnx(model, spec, target, opset=opset, custom_ops=custom_ops, with_buckets=True, replay=replay)
    proto = onnx.load(str(path))
    fused = [node for node in proto.graph.node if (node.domain, node.op_type) == (domain, fused_op)]
    if custom_ops == "ort":  # local layers have their own node, Attend
        assert len(fused) == model.config.attn_layers.count("lsh")
    else:  # every op inlined into standard ONNX: one Attention per attention layer
        assert len(fused) == len(model.config.attn_layers)
        assert not any(node.domain for node in proto.graph.node)
    report = verify_export(model, spec, path, "onnx", twin_path=twin, runtimes=["onnxruntime-cpu"])
    assert report.passed, report.summary_table()


def test_standard_ops_defaulted_seed_and_external_data(tmp_path):
    """custom_ops="standard" leaves only standard ONNX ops; a config without hash_seed records the seed used;
    external data lands next to the model; a shorter max_length is honoured."""
    case = CASES_BY_NAME["lm_lsh_factorised"]
    model = reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**{**case.config_values, "hash_seed": None}))
    path = tmp_path / "model.onnx"
    export_onnx(model.eval(), TASKS["causal-lm"], path, custom_ops="standard", max_length=20, external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    proto = onnx.load(str(path))
    assert all(node.domain == "" for node in proto.graph.node) and not proto.functions
    metadata = {prop.key: json.loads(prop.value) for prop in proto.metadata_props}
    assert metadata[METADATA_PREFIX + "hash_seed"] == 0 and metadata[METADATA_PREFIX + "hash_seed_defaulted"]
    assert metadata[METADATA_PREFIX + "max_length"] == 20
    session = session_for(path)
    input_ids, attention_mask = make_inputs(3, 20)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    actual = run(session, input_ids, attention_mask)[0]
    bound = rounding_bound(lambda: model(input_ids=input_ids, attention_mask=attention_mask).logits)
    assert_kept_within(case.model_class, "logits", actual, expected, bound, attention_mask, "logits")


def test_fp16_export_runs_on_onnxruntime_cpu(tmp_path):
    """fp16 targets CUDA, but ONNX Runtime CPU runs it too. Verified against eager fp16 on the CPU: tolerance
    1e-2 of the output scale (exporters/verify.py)."""
    case = CASES_BY_NAME["lm_mixed"]
    model = reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**case.config_values)).eval()
    path = tmp_path / "model.onnx"
    export_onnx(model, TASKS["causal-lm"], path, dtype="fp16")
    export_onnx(model, TASKS["causal-lm"], tmp_path / "twin.onnx", dtype="fp16", replay=True)
    assert onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_outputs()[0].type == \
        "tensor(float16)"
    report = verify_export(model, TASKS["causal-lm"], path, "onnx", twin_path=tmp_path / "twin.onnx", dtype="fp16",
                           runtimes=["onnxruntime-cpu"])
    assert report.passed, report.summary_table()
    assert all(row.dtype == "fp16" and row.replayed for row in report.rows)


def test_deployment_graph_names_its_dimensions_and_carries_no_trace_metadata(tmp_path):
    """By default no bucket outputs, dynamic dimensions named as ONNX users expect, and none of the exporter's
    per-node debugging metadata (stack traces with local paths made the same export differ between
    machines): two exports of the same model are byte for byte equal."""
    case = CASES_BY_NAME["lm_mixed"]
    model = reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**case.config_values)).eval()
    paths = [tmp_path / "first.onnx", tmp_path / "second.onnx"]
    for path in paths:
        export_onnx(model, TASKS["causal-lm"], path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    proto = onnx.load(str(paths[0]))
    dims = {value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
            for value in [*proto.graph.input, *proto.graph.output]}
    assert dims == {"input_ids": ["batch_size", "sequence_length"], "attention_mask": ["batch_size", "sequence_length"],
                    "logits": ["batch_size", "sequence_length", model.config.vocab_size]}
    assert not any(node.metadata_props or node.doc_string for node in proto.graph.node)
    assert not any(value.metadata_props for value in proto.graph.value_info)


@pytest.mark.parametrize("arguments, message", [
    (dict(custom_ops="fast"), "custom_ops must be one of"),
    (dict(custom_ops="onnx-attention", opset=21), "custom ops onnx-attention need opset 23 or higher"),
    (dict(dtype="bf16"), "unknown dtype"),
    (dict(opset=13), "opset 13 is not supported"),
    (dict(max_length=33), "max_length 33 must be between 1 and"),
    (dict(device="tpu"), "unknown device"),
])
def test_bad_arguments_raise_one_line_errors_and_write_nothing(arguments, message, tmp_path):
    case = CASES_BY_NAME["lm_mixed"]
    model = reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**case.config_values)).eval()
    with pytest.raises(ExportError, match=message) as error:
        export_onnx(model, TASKS["causal-lm"], tmp_path / "model.onnx", **arguments)
    assert "\n" not in str(error.value)
    assert os.listdir(tmp_path) == []


def test_unwritable_folder_fails_before_exporting(tmp_path):
    case = CASES_BY_NAME["lm_mixed"]
    model = reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**case.config_values)).eval()
    with pytest.raises(ExportError, match="cannot write to"):
        export_onnx(model, TASKS["causal-lm"], tmp_path / "missing" / "model.onnx")
    assert os.listdir(tmp_path) == []


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_verifies_on_onnxruntime_cuda(dtype, tmp_path):
    case = CASES_BY_NAME["lm_lsh_factorised"]
    model = reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**case.config_values)).eval()
    path = tmp_path / "model.onnx"
    export_onnx(model, TASKS["causal-lm"], path, dtype=dtype, device="cuda")
    export_onnx(model, TASKS["causal-lm"], tmp_path / "twin.onnx", dtype=dtype, device="cuda", replay=True)
    report = verify_export(model, TASKS["causal-lm"], path, "onnx", twin_path=tmp_path / "twin.onnx", dtype=dtype,
                           device="cuda", runtimes=["onnxruntime-cuda"])
    assert report.rows and all(row.device == "cuda" for row in report.rows), report.skipped
    assert report.passed, report.summary_table()
