"""ONNX Runtime (CPU) against eager PyTorch: generation token for token with the same settings (greedy,
sampling with temperature, top-k, top-p and repetition penalty, prompts of different lengths, streaming), and
task graphs with ragged batches.

Tolerance for task outputs: the first-order rounding bound of eager's computation, element by element
(tests/rounding.py; the same ops, rounded by other kernels)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from exporters.decoder import export_causal_lm_with_past
from generation_configs import CAUSAL_CONFIGS, MIXED_LENGTHS, NEW_TOKENS, mixed_prompts, prompt, random_model
from reformer.generation import generate, stream
from reformer.runtime import OnnxGenerator, OnnxModel
from rounding import assert_within, rounding_bound

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The mixed config (a local and an LSH layer), exported once for the module."""
    model = random_model(CAUSAL_CONFIGS["mixed"])
    directory = tmp_path_factory.mktemp("generator") / "decoder"
    export_causal_lm_with_past(model, str(directory), "onnx", verify=False)
    return model, OnnxGenerator(directory, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_matches_eager(exported, batch):
    model, generator = exported
    input_ids = prompt(batch, 13, seed=batch)
    expected = generate(model, input_ids, NEW_TOKENS).numpy()
    actual = generator.generate(input_ids.numpy(), NEW_TOKENS)
    assert actual.dtype == np.int64 and actual.shape == (batch, 13 + NEW_TOKENS)
    assert (actual == expected).all(), f"first difference at {np.argwhere(actual != expected)[0]}"


def test_io_binding_path_matches_eager(exported):
    """The path CUDA takes (cache kept as OrtValues between steps), run on the CPU."""
    model, generator = exported
    bound = OnnxGenerator(generator.directory, providers=["CPUExecutionProvider"], io_binding=True)
    input_ids = prompt(2, 7, seed=5)
    assert (bound.generate(input_ids.numpy(), 20) == generate(model, input_ids, 20).numpy()).all()


def test_generator_with_arena_shrinkage_matches_eager(exported):
    """Shrinking the arena after each prefill (a CPU session: its CPU arena) changes no token."""
    model, generator = exported
    shrinking = OnnxGenerator(generator.directory, providers=["CPUExecutionProvider"], threads=1, shrink_arena=True)
    assert shrinking.run_options["step"] is None
    assert shrinking.run_options["prefill"].get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    assert all(session.get_session_options().intra_op_num_threads == 1 for session in shrinking.sessions.values())
    rows = mixed_prompts()
    assert (shrinking.generate(rows, 20) == generate(model, rows, 20).numpy()).all()


def test_one_token_prompt_matches_eager(exported):
    """A prompt shorter than a chunk: the LSH layer attends to everything until the reference would hash."""
    model, generator = exported
    input_ids = prompt(2, 1, seed=3)
    assert (generator.generate(input_ids.numpy(), 24) == generate(model, input_ids, 24).numpy()).all()


def test_sampling_and_eos_follow_eager(exported):
    """Both sample with reformer.sampling from the same seed, so they agree on the same logits."""
    model, generator = exported
    input_ids = prompt(2, 6, seed=4)
    options = dict(do_sample=True, top_k=5, top_p=0.9, seed=11)
    sampled = generator.generate(input_ids.numpy(), 20, **options)
    assert (sampled == generate(model, input_ids, 20, **options).numpy()).all()
    eos = int(sampled[0, 9])
    stopped = generator.generate(input_ids.numpy(), 20, eos_token_id=eos, **options)
    assert (stopped == generate(model, input_ids, 20, eos_token_id=eos, **options).numpy()).all()
    assert (stopped[0, 10:] == model.config.pad_token_id).all()


def test_generation_arguments_are_checked(exported):
    _, generator = exported
    with pytest.raises(ValueError, match="139 positions; the export's max_length is 128"):
        generator.generate(np.ones((1, 100), dtype=np.int64), 40)
    with pytest.raises(ValueError, match="pad on the left"):
        generator.generate(np.ones((2, 3), dtype=np.int64), 4, attention_mask=[[1, 1, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="unknown generation option 'top_n'"):
        generator.stream(np.ones((1, 3), dtype=np.int64), 4, top_n=3)
    with pytest.raises(ValueError, match="2-D"):
        generator.generate(np.ones(5, dtype=np.int64), 4)
    with pytest.raises(FileNotFoundError, match="causal-lm-with-past"):
        OnnxGenerator(REPOSITORY)


@pytest.mark.parametrize("io_binding", [False, True])
def test_prompts_of_different_lengths_match_eager_and_rows_alone(exported, io_binding):
    """Greedy: ONNX Runtime's batch equals eager's, and every row equals that row generated alone. With IO
    binding the groups' caches are joined through host copies of their OrtValues."""
    model, generator = exported
    generator = OnnxGenerator(generator.directory, providers=["CPUExecutionProvider"], io_binding=io_binding)
    rows = mixed_prompts()
    actual = generator.generate(rows, NEW_TOKENS)
    assert (actual == generate(model, rows, NEW_TOKENS).numpy()).all()
    width = max(MIXED_LENGTHS)
    for index, row in enumerate(rows):
        assert (actual[index, width - len(row):] == generator.generate([row], NEW_TOKENS)[0]).all(), f"row {index}"
    mask = (actual[:, :width] != 0) | (np.arange(width) >= width - np.array(MIXED_LENGTHS)[:, None])
    assert (generator.generate(actual[:, :width], NEW_TOKENS, attention_mask=mask) == actual).all()


def test_sampling_options_follow_eager(exported):
    """Temperature, top-k, top-p and repetition penalty on prompts of different lengths: the same tokens."""
    model, generator = exported
    rows = mixed_prompts()
    for options in (dict(do_sample=True, temperature=0.7, top_k=8, top_p=0.9, repetition_penalty=1.3, seed=3),
                    dict(repetition_penalty=1.8), dict(do_sample=True, temperature=3.0, seed=4)):
        actual = generator.generate(rows, 40, **options)
        assert (actual == generate(model, rows, 40, **options).numpy()).all(), options
    assert not (generator.generate(rows, 40, repetition_penalty=1.8) == generator.generate(rows, 40)).all()


def test_stream_yields_what_generate_returns(exported):
    model, generator = exported
    rows = mixed_prompts()
    eos = int(generator.generate(rows, 12)[1, max(MIXED_LENGTHS) + 5])
    steps = list(generator.stream(rows, 30, eos_token_id=eos, do_sample=True, seed=2))
    assert all(step.shape == (len(rows),) and step.dtype == np.int64 for step in steps)
    expected = generate(model, rows, 30, eos_token_id=eos, do_sample=True, seed=2)[:, max(MIXED_LENGTHS):]
    assert (np.stack(steps, axis=1) == expected.numpy()).all()
    eager_steps = [step.numpy() for step in stream(model, rows, 30, eos_token_id=eos, do_sample=True, seed=2)]
    assert (np.stack(eager_steps, axis=1) == np.stack(steps, axis=1)).all()


def test_onnx_model_pads_ragged_batches(tmp_path):
    """A task graph exported as exporters/program.py does; ragged rows come back as eager's outputs for each
    row alone. (Local attention: with LSH a row's chunking, hence its outputs, depends on the padded length.)"""
    from exporters.program import export_program
    from exporters.specs import TASKS

    model = random_model(CAUSAL_CONFIGS["local"])
    spec = TASKS["causal-lm"]
    example = (prompt(2, 13), torch.ones(2, 13, dtype=torch.long))
    path = str(tmp_path / "lm.onnx")
    program = export_program(spec.wrap(model), example, model.config.max_position_embeddings)
    torch.onnx.export(program, example, dynamo=True, opset_version=18, input_names=["input_ids", "attention_mask"],
                      output_names=list(spec.output_names)).save(path)
    runtime = OnnxModel(path, providers=["CPUExecutionProvider"])
    rows = [[5, 17, 22], [7, 1, 2, 3, 9, 11, 4, 8, 20]]
    outputs = runtime(rows)
    assert list(outputs) == ["logits"] and outputs["logits"].shape == (2, 9, model.config.vocab_size)
    for index, row in enumerate(rows):
        def logits_alone():
            return model(input_ids=torch.tensor([row])).logits[0]

        with torch.no_grad():
            expected = logits_alone()
        assert_within(outputs["logits"][index, : len(row)], expected, rounding_bound(logits_alone), f"row {index}")
    with pytest.raises(ValueError, match="attention_mask"):
        runtime(np.ones((2, 4), dtype=np.int64), np.ones((2, 3), dtype=np.int64))


def test_runtime_imports_without_torch():
    """What an app embeds: reformer.runtime must not need torch."""
    code = "import sys; sys.modules['torch'] = None; import reformer.runtime; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr.strip().splitlines()[-1:]


def test_onnx_model_returns_task_outputs(tmp_path):
    """A graph that also outputs each LSH layer's buckets (as exported for verification): OnnxModel returns
    the task's outputs, and the buckets only when asked; shrinking the arena after each call changes none."""
    from exporters.program import export_program
    from exporters.specs import TASKS

    model = random_model(CAUSAL_CONFIGS["mixed"])
    spec = TASKS["causal-lm"]
    example = (prompt(2, 13), torch.ones(2, 13, dtype=torch.long))
    path = str(tmp_path / "lm.onnx")
    program = export_program(spec.wrap(model, with_buckets=True), example, model.config.max_position_embeddings)
    torch.onnx.export(program, example, dynamo=True, opset_version=18, input_names=["input_ids", "attention_mask"],
                      output_names=spec.all_output_names(1, with_buckets=True)).save(path)
    input_ids = prompt(3, 21, seed=1)
    with torch.no_grad():
        expected = model(input_ids=input_ids)
    outputs = OnnxModel(path, providers=["CPUExecutionProvider"])(input_ids.numpy())
    assert list(outputs) == ["logits"]
    assert_within(outputs["logits"], expected.logits, rounding_bound(lambda: model(input_ids=input_ids).logits))
    everything = OnnxModel(path, providers=["CPUExecutionProvider"], bucket_outputs=True)(input_ids.numpy())
    assert list(everything) == ["logits", "buckets_0"]
    assert (everything["buckets_0"] == expected.buckets[0].numpy()).all()
    shrinking = OnnxModel(path, providers=["CPUExecutionProvider"], shrink_arena=True)
    assert shrinking.run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    for rows in (input_ids, input_ids[:1, :5]):
        with torch.no_grad():
            logits = model(input_ids=rows).logits
        bound = rounding_bound(lambda: model(input_ids=rows).logits)
        assert_within(shrinking(rows.numpy())["logits"], logits, bound, f"{tuple(rows.shape)}")


# ----- hostile files: refused in one line naming the file, before anything outside the folder is read -----

def graph_with_external_weight(folder, location: str) -> str:
    """y = a + w, w's 4 floats kept in external data at `location` (relative to the graph's folder)."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Add", ["input_ids", "w"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], [weight])
    path = os.path.join(folder, "model.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize("location", ["../outside.bin", "../../outside.bin", "sub/../../outside.bin",
                                      "inside-link.bin", "ABSOLUTE"])
def test_external_data_outside_the_graphs_folder_is_refused(location, tmp_path):
    from reformer import ModelFileError

    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.full(4, 7, np.float32).tobytes())
    (tmp_path / "a" / "model").mkdir(parents=True)
    os.symlink(outside, tmp_path / "a" / "model" / "inside-link.bin")
    os.link(outside, tmp_path / "a" / "outside.bin")  # what ../ names from the graph's folder, as ../../ names outside
    location = str(outside) if location == "ABSOLUTE" else location
    path = graph_with_external_weight(tmp_path / "a" / "model", location)
    with pytest.raises(ModelFileError) as error:
        OnnxModel(path, providers=["CPUExecutionProvider"])
    assert str(error.value) == (f"{path} refers to external data {location!r}, which is not a file in "
                                f"{tmp_path / 'a' / 'model'}: refused, nothing outside a model's folder is read")


def test_external_data_inside_the_graphs_folder_loads(tmp_path):
    (tmp_path / "w.bin").write_bytes(np.full(4, 7, np.float32).tobytes())
    path = graph_with_external_weight(tmp_path, "w.bin")
    logits = OnnxModel(path, providers=["CPUExecutionProvider"]).session.run(None, {"input_ids": np.ones((1, 4),
                                                                                                        np.float32)})
    assert (logits[0] == 8).all()


def tampered(description: dict, change: str) -> None:
    if change == "graph_outside":
        description["files"]["step"] = "../outside.onnx"
    elif change == "max_length_text":
        description["max_length"] = "1024"
    elif change == "cache_wider":
        description["cache_tensors"]["states_0"]["shape"][-1] += 1
    elif change == "cache_dtype":
        description["cache_tensors"]["buckets_1"]["dtype"] = "float32"
    elif change == "outputs_reordered":
        description["step"]["outputs"].reverse()
    elif change == "cache_undescribed":
        description["cache"].append("states_9")
    elif change == "shape_not_a_list":
        description["cache_tensors"]["left_padding"]["shape"] = "batch_size"


@pytest.mark.parametrize("change, message", [
    ("graph_outside", "the step graph '../outside.onnx' is not a file in"),
    ("max_length_text", "max_length must be a positive integer, got '1024'"),
    ("cache_wider", "takes past_states_0 as tensor(float) ["),
    ("cache_dtype", "takes past_buckets_1 as tensor(int64)"),
    ("outputs_reordered", "decoder_step.onnx has inputs"),
    ("cache_undescribed", "'cache' must list names that 'cache_tensors' describes"),
    ("shape_not_a_list", "cache tensor left_padding must have a shape of dimension names and positive sizes"),
    ("not_json", "is not valid JSON"),
])
def test_tampered_decoder_config_is_refused_in_one_line(exported, change, message, tmp_path):
    import json
    import shutil

    from reformer import ModelFileError
    from reformer.sampling import DECODER_CONFIG_NAME

    _, generator = exported
    directory = tmp_path / "decoder"
    shutil.copytree(generator.directory, directory)
    shutil.copy(directory / "decoder_step.onnx", tmp_path / "outside.onnx")  # a graph that would load
    config_path = directory / DECODER_CONFIG_NAME
    description = json.loads(config_path.read_text())
    tampered(description, change)
    config_path.write_text("{" if change == "not_json" else json.dumps(description))
    with pytest.raises(ModelFileError) as error:
        OnnxGenerator(directory, providers=["CPUExecutionProvider"])
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(directory) in str(error.value)
