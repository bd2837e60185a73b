"""ONNX Runtime (CPU) against eager PyTorch: generation token for token, and task graphs with ragged batches.

Tolerance for task outputs: max abs diff <= 1e-5 (fp32 CPU, the same ops in the same order)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from exporters.decoder import export_causal_lm_with_past
from generation_configs import CAUSAL_CONFIGS, NEW_TOKENS, prompt, random_model
from reformer.generation import generate
from reformer.runtime import OnnxGenerator, OnnxModel

ATOL = 1e-5
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
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generator.generate(np.ones((1, 100), dtype=np.int64), 40)
    with pytest.raises(ValueError, match="2-D"):
        generator.generate(np.ones(5, dtype=np.int64), 4)
    with pytest.raises(FileNotFoundError, match="causal-lm-with-past"):
        OnnxGenerator(REPOSITORY)


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
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([row])).logits[0].numpy()
        assert abs(outputs["logits"][index, : len(row)] - expected).max() <= ATOL
    with pytest.raises(ValueError, match="attention_mask"):
        runtime(np.ones((2, 4), dtype=np.int64), np.ones((2, 3), dtype=np.int64))


def test_runtime_imports_without_torch():
    """What an app embeds: reformer.runtime must not need torch."""
    code = "import sys; sys.modules['torch'] = None; import reformer.runtime; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr.strip().splitlines()[-1:]


def test_onnx_model_returns_task_outputs(tmp_path):
    """A graph that also outputs each LSH layer's buckets (as exported for verification): OnnxModel returns
    the task's outputs, and the buckets only when asked."""
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
    assert abs(outputs["logits"] - expected.logits.numpy()).max() <= ATOL
    everything = OnnxModel(path, providers=["CPUExecutionProvider"], bucket_outputs=True)(input_ids.numpy())
    assert list(everything) == ["logits", "buckets_0"]
    assert (everything["buckets_0"] == expected.buckets[0].numpy()).all()
