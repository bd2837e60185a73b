"""Checkpoint directories: what `transformers` writes loads unchanged; what we write loads back identically;
weights that do not fit, and pickles that would run code, are refused with a `CheckpointError`.

Loading copies weights, so outputs of the same weights must agree exactly (tolerance 0)."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import reformer
from reference import reference_and_ours
from tiny_configs import CASES_BY_NAME, make_inputs

LM_CASE = CASES_BY_NAME["lm_mixed"]


def outputs(model, name="logits"):
    input_ids, attention_mask = make_inputs(2, 13)
    with torch.no_grad():
        return getattr(model(input_ids=input_ids, attention_mask=attention_mask), name)


def assert_same_weights(model, state):
    ours = model.state_dict()
    for key, value in ours.items():
        assert torch.equal(value, state[key]), key


@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("transformers")
    reference, _ = reference_and_ours(LM_CASE, directory)
    return directory, reference


@pytest.fixture
def transformers_directory(saved_by_transformers, tmp_path):
    """A private copy of a causal LM saved by `transformers` (config.json + model.safetensors), and the
    reference model."""
    directory, reference = saved_by_transformers
    copy = tmp_path / "transformers"
    shutil.copytree(directory, copy)
    return copy, reference


def test_loads_transformers_safetensors_directory(transformers_directory):
    directory, reference = transformers_directory
    assert (directory / "model.safetensors").is_file() and not (directory / "pytorch_model.bin").exists()
    model = reformer.ReformerModelWithLMHead.from_pretrained(directory)
    assert not model.training
    assert_same_weights(model, reference.state_dict())


def test_loads_pytorch_model_bin(transformers_directory):
    directory, reference = transformers_directory
    os.remove(directory / "model.safetensors")
    torch.save(reference.state_dict(), directory / "pytorch_model.bin")
    model = reformer.ReformerModelWithLMHead.from_pretrained(directory)
    assert_same_weights(model, reference.state_dict())


def test_head_checkpoint_loads_into_base_model(transformers_directory):
    directory, _ = transformers_directory
    with_head = reformer.ReformerModelWithLMHead.from_pretrained(directory)
    base = reformer.ReformerModel.from_pretrained(directory)
    assert not any(key.startswith("lm_head") for key in base.state_dict())
    assert torch.equal(outputs(base, "last_hidden_state"), outputs(with_head.reformer, "last_hidden_state"))


def test_save_and_load_round_trip(transformers_directory, tmp_path):
    directory, _ = transformers_directory
    model = reformer.ReformerModelWithLMHead.from_pretrained(directory)
    copy_directory = tmp_path / "copy"
    model.save_pretrained(copy_directory)
    # Exactly the two files, written atomically: no temporary files left behind.
    assert sorted(os.listdir(copy_directory)) == ["config.json", "model.safetensors"]
    copy = reformer.ReformerModelWithLMHead.from_pretrained(copy_directory)
    assert copy.config.to_dict() == {**model.config.to_dict(), "architectures": ["ReformerModelWithLMHead"]}
    assert_same_weights(copy, model.state_dict())
    assert torch.equal(outputs(copy), outputs(model))


def rewrite_weights(directory, change):
    path = directory / "model.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda state: state.pop("reformer.encoder.layers.1.feed_forward.dense.dense.weight"),
         "1 missing weight(s): reformer.encoder.layers.1.feed_forward.dense.dense.weight"),
        (lambda state: state.update({"reformer.encoder.layers.9.extra": torch.zeros(2)}),
         "1 unexpected weight(s): reformer.encoder.layers.9.extra"),
        (lambda state: state.update({"lm_head.decoder.weight": torch.zeros(31, 32)}),
         "1 mis-shaped weight(s): lm_head.decoder.weight (31, 32) vs (30, 32)"),
    ],
    ids=["missing", "unexpected", "mis-shaped"],
)
def test_weights_that_do_not_fit_are_named(transformers_directory, change, message):
    directory, _ = transformers_directory
    rewrite_weights(directory, change)
    with pytest.raises(reformer.CheckpointError, match="weights do not fit ReformerModelWithLMHead") as error:
        reformer.ReformerModelWithLMHead.from_pretrained(directory)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_directory_without_weights_is_an_error(transformers_directory):
    directory, _ = transformers_directory
    os.remove(directory / "model.safetensors")
    with pytest.raises(reformer.CheckpointError, match="no weights in"):
        reformer.ReformerModelWithLMHead.from_pretrained(directory)


class CodeRunningPayload:
    """Unpickles by calling exec: a stand-in for a checkpoint that runs code when loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_pickle_that_runs_code_is_refused(transformers_directory, tmp_path):
    directory, reference = transformers_directory
    os.remove(directory / "model.safetensors")
    marker = tmp_path / "code-ran"
    state = {**reference.state_dict(), "lm_head.decoder.bias": CodeRunningPayload(str(marker))}
    torch.save(state, directory / "pytorch_model.bin")
    # The payload is live: an unrestricted load runs it.
    torch.load(directory / "pytorch_model.bin", weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(reformer.CheckpointError, match="holds more than tensors and was not loaded") as error:
        reformer.ReformerModelWithLMHead.from_pretrained(directory)
    assert not marker.exists()
    assert "\n" not in str(error.value)
