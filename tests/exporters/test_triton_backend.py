"""exporters.triton.backend without a server: the Python-backend models driven as Triton drives them (initialize,
then execute on a batch of requests), through a stand-in for the server's `triton_python_backend_utils`, on
tiny exported repositories. A batch of requests of mixed lengths, padding and options returns, for each request,
what the graph gives that request alone; a bad request gets an error response and the rest of its batch is
served; the request checks on their own. The real server: tests/exporters/test_triton_server.py."""

from __future__ import annotations

import json
import os
import re
import sys
import types

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient (the serve or test extra)")

from google.protobuf import json_format  # noqa: E402

from exporters import api, onnx_files  # noqa: E402
from exporters.triton.backend import (  # noqa: E402
    BadRequest,
    GenerationModel,
    TaskModel,
    check_attention_mask,
    check_token_ids,
    steps_until_finished,
)
from exporters.triton.layout import parse_config  # noqa: E402
from reformer.file_checks import external_data_locations  # noqa: E402
from reformer.runtime import OnnxGenerator, OnnxModel  # noqa: E402

VOCAB, MAX_LENGTH = 258, 64  # models/tiny/config.json's vocabulary; the export's maximum length


class StandInTensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


class StandInResponse:
    def __init__(self, output_tensors, error=None):
        self.outputs = {tensor.name: tensor.array for tensor in output_tensors}
        self.error = error


@pytest.fixture
def triton_utils(monkeypatch):
    """The server's module, as far as the models use it: requests are {name: StandInTensor} dicts."""
    module = types.SimpleNamespace(
        Tensor=StandInTensor, InferenceResponse=StandInResponse, TritonError=lambda message: message,
        get_input_tensor_by_name=lambda request, name: request.get(name))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


def request(**arrays):
    return {name: StandInTensor(name, array) for name, array in arrays.items()}


def initialized(model, repository, name):
    """The model initialized as the server does it: the config as JSON, the model's folder and version."""
    with open(os.path.join(repository, name, "config.pbtxt"), encoding="utf-8") as handle:
        config = json_format.MessageToDict(parse_config(handle.read()), preserving_proto_field_name=True)
    model.initialize({"model_config": json.dumps(config), "model_repository": os.path.join(repository, name),
                      "model_version": "1", "model_instance_kind": "CPU"})
    return model


def test_a_batch_of_mixed_requests_answers_each_as_alone(tmp_path, triton_utils):
    api.run_export(api.ExportRequest("triton", model="tiny", max_length=MAX_LENGTH, output=str(tmp_path / "repo"),
                                     verify=False))
    model = initialized(TaskModel(), str(tmp_path / "repo"), "tiny-causal-lm")
    rng = np.random.default_rng(0)
    padded = np.ones((2, 40), dtype=np.int64)
    padded[1, 25:] = 0
    good = [request(input_ids=rng.integers(0, VOCAB, (1, 40))),
            request(input_ids=rng.integers(0, VOCAB, (2, 40)), attention_mask=padded),  # same length: one run
            request(input_ids=rng.integers(0, VOCAB, (1, 7))),
            request(input_ids=rng.integers(0, VOCAB, (1, MAX_LENGTH)))]
    bad = {1: (request(input_ids=np.array([[3, VOCAB]])), "outside the vocabulary"),
           3: (request(input_ids=np.ones((1, MAX_LENGTH + 1), dtype=np.int64)), "serves at most 64"),
           5: (request(input_ids=np.ones((1, 0), dtype=np.int64)), "is empty"),
           6: (request(input_ids=np.ones((1, 3), dtype=np.int64), attention_mask=np.full((1, 3), 2)), "0 \\(padding")}
    batch = list(good)
    for index, (bad_request, _) in sorted(bad.items()):
        batch.insert(index, bad_request)
    responses = model.execute(batch)
    assert len(responses) == len(batch)
    direct = OnnxModel(str(tmp_path / "repo" / "tiny-causal-lm" / "1" / "model.onnx"))
    good_responses = [response for index, response in enumerate(responses) if index not in bad]
    for sent, response in zip(good, good_responses):
        assert response.error is None
        ids = sent["input_ids"].array
        mask = sent["attention_mask"].array if "attention_mask" in sent else None
        # Rows of equal length run together are computed as alone: bitwise equal.
        np.testing.assert_array_equal(response.outputs["logits"], direct(ids, mask)["logits"])
    for index, (_, message) in bad.items():
        assert responses[index].error is not None and not responses[index].outputs
        assert re.search(message, responses[index].error)


def test_a_graph_with_a_data_file_is_served_from_its_folder(tmp_path, triton_utils, monkeypatch):
    """A graph over 2 GiB (the threshold lowered so the tiny model is one) keeps its weights in a data file:
    the version folder holds Triton's folder form, 1/model.onnx/ with the graph and the data file under the
    name the graph gives it, which the backend opens through reformer.runtime."""
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_THRESHOLD", 0)
    api.run_export(api.ExportRequest("triton", model="tiny", max_length=MAX_LENGTH, output=str(tmp_path / "repo"),
                                     verify=False))
    version = tmp_path / "repo" / "tiny-causal-lm" / "1"
    assert sorted(os.listdir(version)) == ["model.onnx", "model.py"]
    assert sorted(os.listdir(version / "model.onnx")) == ["model.onnx", "model.onnx.data"]
    assert set(external_data_locations(version / "model.onnx" / "model.onnx")) == {"model.onnx.data"}
    model = initialized(TaskModel(), str(tmp_path / "repo"), "tiny-causal-lm")
    input_ids = np.arange(1, 8)[None]
    response, = model.execute([request(input_ids=input_ids)])
    assert response.error is None
    np.testing.assert_array_equal(response.outputs["logits"],
                                  OnnxModel(version / "model.onnx" / "model.onnx")(input_ids)["logits"])


def test_generation_batches_answer_each_request_as_alone(tmp_path, triton_utils):
    api.run_export(api.ExportRequest("triton", model="tiny", task=api.GENERATION_TASK, max_length=MAX_LENGTH,
                                     output=str(tmp_path / "repo"), verify=False))
    model = initialized(GenerationModel(), str(tmp_path / "repo"), "tiny-causal-lm-with-past")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, VOCAB, (rows, length)) for rows, length in ((1, 5), (2, 9), (1, 5), (1, 20))]
    options = [{}, {}, {"do_sample": True, "seed": 3, "top_k": 5}, {"repetition_penalty": 1.2}]
    direct = OnnxGenerator(str(tmp_path / "repo" / "tiny-causal-lm-with-past" / "1" / "graphs"))
    eos = int(direct.generate(prompts[0], 6)[0, 5 + 1])  # request 0 stops after its second new token
    options[0] = {"eos_token_id": eos}
    batch = []
    for prompt, chosen in zip(prompts, options):
        rows = len(prompt)
        arrays = {name: np.full((rows, 1), value) for name, value in chosen.items()}
        batch.append(request(input_ids=prompt, max_new_tokens=np.full((rows, 1), 6, dtype=np.int32), **arrays))
    batch.append(request(input_ids=prompts[0], max_new_tokens=np.array([[MAX_LENGTH]], dtype=np.int32)))
    responses = model.execute(batch)
    for prompt, chosen, response in zip(prompts, options, responses):
        assert response.error is None
        expected = direct.generate(prompt, 6, **chosen)[:, prompt.shape[1]:]
        np.testing.assert_array_equal(response.outputs["output_ids"], expected)
    assert responses[0].outputs["output_ids"].shape[1] <= 2
    assert "positions" in responses[-1].error


# ----- the request checks (the server's answers to them: tests/exporters/test_triton_server.py) -----

@pytest.mark.parametrize("input_ids, message", [
    (np.zeros((1, 3), dtype=np.int32), "must be int64"),
    (np.zeros(3, dtype=np.int64), "must be int64 of shape"),
    (np.zeros((1, 0), dtype=np.int64), "is empty"),
    (np.zeros((1, 65), dtype=np.int64), "has 65 tokens; this model serves at most 64"),
    (np.array([[1, 258]]), "token id 258 is outside the vocabulary"),
    (np.array([[-1, 2]]), "token id -1 is outside the vocabulary"),
])
def test_bad_token_ids_are_refused(input_ids, message):
    with pytest.raises(BadRequest, match=message):
        check_token_ids(input_ids, VOCAB, MAX_LENGTH)


def test_masks_must_match_the_ids_and_hold_zeros_and_ones():
    ids = np.ones((2, 3), dtype=np.int64)
    assert (check_attention_mask(None, ids) == 1).all()
    with pytest.raises(BadRequest, match="shape of input_ids"):
        check_attention_mask(np.ones((2, 4), dtype=np.int64), ids)
    with pytest.raises(BadRequest, match="0 \\(padding\\) and 1"):
        check_attention_mask(np.full((2, 3), 2, dtype=np.int64), ids)


def test_a_request_stops_where_all_its_rows_have_produced_eos():
    eos = 1
    assert steps_until_finished(np.array([[5, 1, 0, 0], [7, 8, 1, 0]]), eos) == 3
    assert steps_until_finished(np.array([[5, 1, 0, 0], [7, 8, 9, 9]]), eos) == 4  # one row never did
    assert steps_until_finished(np.array([[5, 1, 0, 0]]), None) == 4
