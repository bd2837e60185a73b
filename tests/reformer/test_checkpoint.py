"""Checkpoint directories: what `transformers` writes loads unchanged; what we write loads back identically;
weights that do not fit, and pickles that would run code, are refused with a `CheckpointError`.

Loading copies weights, so outputs of the same weights must agree exactly (tolerance 0)."""

import json
import os
import shutil
import sys

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
    """Exactly `state`'s weights, in the model's dtypes."""
    ours = model.state_dict()
    for key, value in ours.items():
        assert torch.equal(value, state[key].to(value.dtype)), key


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


# ----- transformers' keywords -----

@pytest.mark.parametrize("keywords,expected", [
    (dict(dtype=torch.float16), torch.float16),
    (dict(torch_dtype="bfloat16"), torch.bfloat16),
    (dict(dtype="float64", torch_dtype=torch.float64), torch.float64),
    (dict(), torch.float32),
])
def test_dtype_keywords_set_the_model_dtype(transformers_directory, keywords, expected):
    directory, reference = transformers_directory
    model = reformer.ReformerModelWithLMHead.from_pretrained(directory, **keywords)
    assert {parameter.dtype for parameter in model.parameters()} == {expected}
    assert_same_weights(model, reference.state_dict())


def test_auto_dtype_is_the_configs_else_the_weights(transformers_directory):
    directory, _ = transformers_directory
    config = json.loads((directory / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (directory / "config.json").write_text(json.dumps(config))
    rewrite_weights(directory, lambda state: state.update({key: value.half() for key, value in state.items()}))
    model = reformer.ReformerModelWithLMHead.from_pretrained(directory, dtype="auto")
    assert next(model.parameters()).dtype == torch.float16
    (directory / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    model = reformer.ReformerModelWithLMHead.from_pretrained(directory, torch_dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("keywords", [dict(device_map="cpu"), dict(device="cpu"), dict(device_map="auto"),
                                      dict(device_map=torch.device("cpu"), device="cpu")])
def test_device_keywords_place_the_model(transformers_directory, keywords):
    directory, _ = transformers_directory
    model = reformer.ReformerModelWithLMHead.from_pretrained(directory, **keywords)
    expected = "cuda" if keywords.get("device_map") == "auto" and torch.cuda.is_available() else "cpu"
    assert {parameter.device.type for parameter in model.parameters()} == {expected}


@pytest.mark.parametrize("keywords,message", [
    (dict(dtype="int8"), "dtype 'int8' is not supported: give one of float32, float16, bfloat16, float64"),
    (dict(torch_dtype=torch.int64), "dtype torch.int64 is not supported"),
    (dict(dtype="float16", torch_dtype="float32"), "dtype 'float16' and torch_dtype 'float32' differ"),
    (dict(device_map={"": 0}), "device_map as a dict (the model split across devices) is not supported"),
    (dict(device="tpu"), "device 'tpu' is not supported: give 'cpu', 'cuda', 'cuda:N', a GPU index or 'auto'"),
    (dict(device="cuda:99"), "device 'cuda:99' requested but torch sees"),
])
def test_unsupported_keyword_values_are_refused_before_loading(keywords, message):
    """Checked first: the directory does not exist, and the error is about the keyword."""
    with pytest.raises(ValueError) as error:
        reformer.ReformerModelWithLMHead.from_pretrained("no-such-directory", **keywords)
    assert not isinstance(error.value, reformer.CheckpointError)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_device_map_and_device_must_agree(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # "cuda" is then a device, even here
    with pytest.raises(ValueError, match="device_map 'cpu' and device 'cuda' differ: give one"):
        reformer.ReformerModelWithLMHead.from_pretrained("no-such-directory", device_map="cpu", device="cuda")


# ----- Hugging Face Hub ids -----

def test_hub_id_loads_from_the_huggingface_cache(transformers_directory, hub_cache):
    directory, reference = transformers_directory
    hub_cache("google/tiny-reformer", directory)
    model = reformer.ReformerModelWithLMHead.from_pretrained("google/tiny-reformer", dtype=torch.float16)
    assert next(model.parameters()).dtype == torch.float16
    assert_same_weights(model, reference.state_dict())


def test_existing_directory_wins_over_a_hub_id(transformers_directory, hub_cache, tmp_path, monkeypatch):
    directory, reference = transformers_directory
    hub_cache("google/tiny-reformer", directory)
    torch.manual_seed(1)
    local = reformer.ReformerModelWithLMHead(reformer.ReformerConfig.from_pretrained(directory))
    local.save_pretrained(tmp_path / "google" / "tiny-reformer")
    monkeypatch.chdir(tmp_path)
    assert_same_weights(reformer.ReformerModelWithLMHead.from_pretrained("google/tiny-reformer"), local.state_dict())


def test_hub_id_missing_from_the_offline_cache_is_one_line(hub_cache):
    with pytest.raises(reformer.CheckpointError) as error:
        reformer.ReformerModelWithLMHead.from_pretrained("google/not-cached")
    message = str(error.value)
    assert message.startswith("no model directory google/not-cached, and Hugging Face Hub model google/not-cached "
                              "could not be fetched: ") and "\n" not in message


def test_hub_id_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(reformer.CheckpointError, match="Hugging Face Hub ids need huggingface_hub: pip install "
                                                       "huggingface_hub"):
        reformer.ReformerModelWithLMHead.from_pretrained("google/reformer-enwik8")


# ----- hostile files: one line naming the file, nothing read outside the checkpoint directory -----

def lying_header(state_path, lie: str) -> None:
    """Rewrite model.safetensors' JSON header (after its 8-byte length) so that it lies about the data."""
    raw = state_path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + length]), raw[8 + length:]
    name = next(key for key in header if key != "__metadata__")
    if lie == "tensor_past_the_end":
        header[name]["shape"], header[name]["data_offsets"] = [10**6, 10**6], [0, 4 * 10**12]
    elif lie == "shape_bigger_than_its_bytes":
        header[name]["shape"] = [dim * 2 for dim in header[name]["shape"]]
    text = json.dumps(header).encode()
    declared = 2**40 if lie == "header_longer_than_the_file" else len(text)
    state_path.write_bytes(declared.to_bytes(8, "little") + text + data)


@pytest.mark.parametrize("lie, problem", [
    ("tensor_past_the_end", "invalid offset"),
    ("shape_bigger_than_its_bytes", "invalid shape, data type, or offset"),
    ("header_longer_than_the_file", "header too large"),
])
def test_safetensors_header_that_lies_about_sizes_is_refused(transformers_directory, lie, problem):
    directory, _ = transformers_directory
    lying_header(directory / "model.safetensors", lie)
    with pytest.raises(reformer.CheckpointError) as error:
        reformer.ReformerModelWithLMHead.from_pretrained(directory)
    message = str(error.value)
    assert message.startswith(f"cannot read safetensors weights {directory / 'model.safetensors'}: ") and problem in \
        message and "\n" not in message


@pytest.mark.parametrize("shard", ["../model.safetensors", "/tmp/model.safetensors", "a/../../model.safetensors"])
def test_shard_index_naming_a_file_outside_the_directory_is_refused(transformers_directory, tmp_path, shard):
    directory, _ = transformers_directory
    os.replace(directory / "model.safetensors", tmp_path / "model.safetensors")  # a shard that would load
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.decoder.bias": shard}}))
    with pytest.raises(reformer.CheckpointError) as error:
        reformer.ReformerModelWithLMHead.from_pretrained(directory)
    assert str(error.value) == (f"{directory / 'model.safetensors.index.json'} names the shard {shard!r}, which is "
                                "not a file in its folder")


def test_config_beyond_the_machines_memory_is_refused_before_allocating(transformers_directory, monkeypatch):
    """10^9 hidden units: the error names what the weights need, and no weight was allocated (torch.empty,
    which every parameter's allocation goes through, is never reached)."""
    directory, _ = transformers_directory
    config = json.loads((directory / "config.json").read_text())
    config.update(hidden_size=10**9, axial_pos_embds=False)
    (directory / "config.json").write_text(json.dumps(config))

    def no_allocation(*arguments, **options):
        raise AssertionError("a tensor was allocated")

    monkeypatch.setattr(torch, "empty", no_allocation)
    with pytest.raises(reformer.CheckpointError) as error:
        reformer.ReformerModelWithLMHead.from_pretrained(directory)
    assert str(error.value).startswith(f"{directory / 'config.json'} describes a model of ")
    assert "parameters, whose fp32 weights need" in str(error.value) and "GiB available" in str(error.value)
