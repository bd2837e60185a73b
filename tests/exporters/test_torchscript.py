"""TorchScript export against eager, for every task on the tiny configs.

The trace is taken at batch 2 and one length (see exporters.specs.example_length); the loaded module is
run at other batch sizes and at lengths shorter than one chunk, odd, and maximal, with padded masks.
Tolerance: the first-order rounding bound of eager's computation, element by element (tests/rounding.py; in
practice the traced graph runs the same kernels as eager, so the difference is 0). Per-position outputs are
compared where the mask keeps the position (see tests/reformer/test_parity.py); buckets must agree exactly
there."""

from __future__ import annotations

import warnings

import pytest
import torch

import reformer
from exporters.specs import TASKS
from exporters.specs import example_inputs, example_length
from exporters.torchscript import export_torchscript, load_metadata, non_host_ops
from graph_checks import assert_graph_matches_eager
from tiny_configs import CONFIGS_PER_TASK, build, make_inputs, task_configs

PARAMS = [(task, name, values) for task in TASKS for name, values in task_configs(task)]


def test_every_task_has_enough_configs():
    for task in TASKS:
        assert len(task_configs(task)) >= CONFIGS_PER_TASK, task


@pytest.mark.parametrize("task,name,values", PARAMS, ids=[f"{task}-{name}" for task, name, _ in PARAMS])
def test_traced_module_matches_eager_at_other_shapes(task, name, values, tmp_path):
    spec, model = TASKS[task], build(task, values)
    path = str(tmp_path / "model.pt")
    export_torchscript(model, spec, path, with_buckets=True)
    loaded = torch.jit.load(path)
    assert non_host_ops(loaded) == []
    config = model.config
    traced_length = example_length(config.padding_multiple, config.max_position_embeddings)
    shapes = [(1, 3), (3, 11), (4, config.max_position_embeddings)]
    assert all(shape != (2, traced_length) for shape in shapes)
    assert_graph_matches_eager(spec, model, "torchscript", path, shapes)


def test_metadata_describes_the_graph(tmp_path):
    task, (_, values) = "question-answering", task_configs("question-answering")[0]
    model = build(task, values)
    path = str(tmp_path / "qa.pt")
    export_torchscript(model, TASKS[task], path, max_length=24, with_buckets=True, metadata={"model_name": "tiny-case"})
    metadata = load_metadata(path)
    lsh_layers = model.config.attn_layers.count("lsh")
    assert metadata["task"] == task
    assert metadata["input_names"] == ["input_ids", "attention_mask"]
    assert metadata["output_names"] == ["start_logits", "end_logits"] + [f"buckets_{i}" for i in range(lsh_layers)]
    assert metadata["hash_seed"] == model.config.resolved_hash_seed
    assert metadata["max_length"] == 24
    assert metadata["model_name"] == "tiny-case"


def test_by_default_returns_only_the_task_outputs(tmp_path):
    _, values = task_configs("causal-lm")[0]
    model = build("causal-lm", values)
    path = str(tmp_path / "lm.pt")
    export_torchscript(model, TASKS["causal-lm"], path)
    input_ids, attention_mask = make_inputs(2, 9)
    outputs = torch.jit.load(path)(input_ids, attention_mask)
    assert len(outputs) == 1 and outputs[0].shape == (2, 9, model.config.vocab_size)


def test_export_leaves_the_callers_model_unchanged(tmp_path):
    _, values = task_configs("base")[0]
    model = build("base", values)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    export_torchscript(model, TASKS["base"], str(tmp_path / "base.pt"), dtype="fp16")
    after = model.state_dict()
    assert all(after[key].dtype == value.dtype and torch.equal(after[key], value) for key, value in before.items())


def test_example_inputs_span_more_than_one_chunk_and_pad_a_row():
    _, values = task_configs("base")[0]
    config = reformer.ReformerConfig(**values)
    length = example_length(config.padding_multiple, config.max_position_embeddings)
    assert length > config.padding_multiple and length % config.padding_multiple != 0
    input_ids, attention_mask = example_inputs(config, config.max_position_embeddings, "cpu")
    assert input_ids.shape == (2, length) and attention_mask[1, -1] == 0 and attention_mask[0].all()


def test_failed_save_leaves_nothing(tmp_path):
    _, values = task_configs("base")[0]
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        export_torchscript(build("base", values), TASKS["base"], str(blocker / "model.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


class PythonStep(torch.autograd.Function):
    @staticmethod
    def forward(context, x):
        return x * 2

    @staticmethod
    def backward(context, grad):
        return grad * 2


class WithPythonOp(torch.nn.Module):
    def forward(self, x):
        return PythonStep.apply(x) + 1


def test_python_ops_are_not_host_ops():
    traced = torch.jit.trace(WithPythonOp(), torch.ones(2))
    assert non_host_ops(traced) == ["prim::PythonOp"]


def test_torch_deprecation_warnings_do_not_reach_users(tmp_path):
    """torch warns that TorchScript is deprecated on every trace, save and load; the exporter ships it on purpose
    (the legacy format) and silences exactly that warning, nothing else."""
    _, values = task_configs("base")[0]
    path = str(tmp_path / "base.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_torchscript(build("base", values), TASKS["base"], path)
        load_metadata(path)
        torch.jit.load(path)  # not through the exporter: torch's warning still comes
    deprecations = [str(warning.message) for warning in caught if issubclass(warning.category, DeprecationWarning)]
    assert deprecations == ["`torch.jit.load` is deprecated. Please switch to `torch.export`."]
