"""exporters.triton.layout: model repositories for each Triton backend, written from real (tiny) exports and
parsed with Triton's own schema offline; the export requests that are refused because they cannot be served. The
Python-backend models: tests/exporters/test_triton_backend.py; the served repository against a real server:
tests/exporters/test_triton_server.py."""

from __future__ import annotations

import os

import numpy as np
import pytest

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="needs tritonclient (the serve or test extra)")

from exporters import api  # noqa: E402
from exporters.errors import ExportError  # noqa: E402
from exporters.triton.backend import GENERATION_OPTIONS  # noqa: E402
from exporters.triton.layout import (  # noqa: E402
    MAX_BATCH_SIZE,
    MAX_QUEUE_DELAY_MICROSECONDS,
    ModelConfig,
    Tensor,
    TritonExportError,
    parse_config,
)

TINY_VOCAB = 258  # models/tiny/config.json
TRITON_TYPES = {"TYPE_FP32": "float32", "TYPE_INT64": "int64", "TYPE_INT32": "int32", "TYPE_BOOL": "bool"}


def read_config(repository, name):
    with open(os.path.join(repository, name, "config.pbtxt"), encoding="utf-8") as handle:
        return parse_config(handle.read())


def tensors(entries):
    return {entry.name: (TRITON_TYPES[model_config_pb2.DataType.Name(entry.data_type)], list(entry.dims))
            for entry in entries}


@pytest.mark.parametrize("backend, graph", [("onnxruntime", "model.onnx"), ("pytorch", "model.pt"),
                                            ("python", "model.onnx")])
def test_repository_for_each_backend_parses_with_tritons_schema(tmp_path, backend, graph):
    """The config describes the verified graph: its names, dtypes and dims without the batch axis, batching and a
    CPU instance; the graph sits in version 1, and only the Python backend has a model.py. Without verification,
    to keep the test short: the served-model test (tests/exporters/test_triton_server.py) exports verified."""
    os.chdir(tmp_path)
    result = api.run_export(api.ExportRequest("triton", model="tiny", max_length=64, triton_backend=backend,
                                              verify=False))
    assert result.passed and result.output == "tiny-triton"
    assert sorted(os.listdir("tiny-triton")) == ["tiny-causal-lm"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")], "no staging folder left"
    files = sorted(os.listdir("tiny-triton/tiny-causal-lm/1"))
    assert files == sorted([graph] + (["model.py"] if backend == "python" else []))
    config = read_config("tiny-triton", "tiny-causal-lm")
    assert (config.name, config.backend, config.max_batch_size) == ("tiny-causal-lm", backend, MAX_BATCH_SIZE)
    assert tensors(config.input) == {"input_ids": ("int64", [-1]), "attention_mask": ("int64", [-1])}
    assert tensors(config.output) == {"logits": ("float32", [-1, TINY_VOCAB])}
    assert [entry.optional for entry in config.input] == [False, backend == "python"]
    assert config.dynamic_batching.max_queue_delay_microseconds == MAX_QUEUE_DELAY_MICROSECONDS
    cpu = model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert [(group.kind, group.count) for group in config.instance_group] == [(cpu, 1)]
    if backend == "python":
        assert {key: value.string_value for key, value in config.parameters.items()} == {
            "vocab_size": str(TINY_VOCAB), "max_length": "64"}
    assert result.settings["triton_backend"] == backend
    assert "tiny-causal-lm" in result.summary_table()


def test_sequence_classification_outputs_one_row_per_sequence(tmp_path):
    os.chdir(tmp_path)
    api.run_export(api.ExportRequest("triton", model="tiny", task="sequence-classification", max_length=64,
                                     triton_backend="onnxruntime", output="repo", verify=False))
    config = read_config("repo", "tiny-sequence-classification")
    assert tensors(config.output) == {"logits": ("float32", [2])}  # num_labels; no sequence axis


def test_generation_repository_holds_the_graphs_and_a_python_loop(tmp_path):
    os.chdir(tmp_path)
    result = api.run_export(api.ExportRequest("triton", model="tiny", task=api.GENERATION_TASK, max_length=64,
                                              output="repo", verify=False))
    assert result.passed
    version = "repo/tiny-causal-lm-with-past/1"
    assert sorted(os.listdir(version)) == ["graphs", "model.py"]
    assert "decoder_config.json" in os.listdir(f"{version}/graphs")
    assert "GenerationModel as TritonPythonModel" in open(f"{version}/model.py", encoding="utf-8").read()
    config = read_config("repo", "tiny-causal-lm-with-past")
    inputs = tensors(config.input)
    assert inputs.pop("input_ids") == ("int64", [-1]) and inputs.pop("max_new_tokens") == ("int32", [1])
    assert inputs == {name: (np.dtype(dtype).name, [1]) for name, dtype in GENERATION_OPTIONS.items()}
    assert tensors(config.output) == {"output_ids": ("int64", [-1])}


@pytest.mark.parametrize("options, message", [
    (dict(format="onnx", triton_backend="python"), "--triton-backend applies to --format triton only"),
    (dict(task=api.GENERATION_TASK, triton_backend="onnxruntime"), "use --triton-backend python"),
    (dict(triton_backend="pytorch", opset=18), "--opset applies to ONNX only"),
    (dict(triton_backend="tensorrt"), "unknown Triton backend 'tensorrt'"),
])
def test_requests_that_cannot_be_served_are_refused_before_exporting(tmp_path, options, message):
    os.chdir(tmp_path)
    with pytest.raises(ExportError, match=message):
        api.run_export(api.ExportRequest(**{"format": "triton", "model": "tiny", **options}))
    assert os.listdir(tmp_path) == []


def test_an_existing_output_is_refused(tmp_path):
    (tmp_path / "repo").mkdir()
    with pytest.raises(TritonExportError, match="already exists"):
        api.run_export(api.ExportRequest("triton", model="tiny", output=str(tmp_path / "repo")))


def test_a_config_triton_would_refuse_fails_the_parse():
    good = ModelConfig("m", "python", (Tensor("input_ids", "int64", (-1,)),), (Tensor("logits", "float32", (-1,)),),
                       "cpu")
    assert parse_config(good.text()).name == "m"
    with pytest.raises(TritonExportError, match="does not parse with Triton's schema"):
        parse_config(good.text() + "dynamic_batching { max_queue_delay: 5 }\n")  # unknown field
    with pytest.raises(TritonExportError, match="does not parse"):
        parse_config(good.text().replace("KIND_CPU", "KIND_TPU"))  # unknown enum value
