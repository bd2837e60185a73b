"""The ONNX Runtime options reformer.runtime sets: what a CPU session really gets, the CUDA provider options built
for a CUDA request (pure functions: no GPU needed), and the arena shrink run option. Outputs against eager are
in test_runtime.py."""

import json
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from reformer.runtime import (
    CPU,
    CUDA,
    cuda_provider_options,
    open_session,
    shrink_arena_run_options,
    with_provider_options,
)
from rounding import assert_within, rounding_bound

SHRINKAGE = "memory.enable_memory_arena_shrinkage"
WEIGHT = np.arange(16, dtype=np.float32).reshape(4, 4) - 8


@pytest.fixture(scope="module")
def graph_path(tmp_path_factory):
    """y = relu(x @ WEIGHT), x float N x 4 with N dynamic: the smallest graph with a dynamic shape."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["product"]), helper.make_node("Relu", ["product"], ["y"])],
        "relu_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(WEIGHT, "weight")])
    path = tmp_path_factory.mktemp("graph") / "relu_matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def assert_relu_matmul(y: np.ndarray, rows: np.ndarray) -> None:
    """y against relu(rows @ WEIGHT) within the product's rounding bound, 4 eps |rows| @ |WEIGHT|: the sum of 4
    products of up to 8 may cancel, so an ulp of the result says nothing."""
    def relu_matmul(x):
        return torch.relu(x @ torch.from_numpy(WEIGHT))

    rows = torch.from_numpy(rows)
    assert_within(y, relu_matmul(rows), rounding_bound(relu_matmul, rows), "relu(x @ weight)")


def test_cuda_options_are_strict_fp32_with_a_shrinkable_arena():
    assert cuda_provider_options() == {"arena_extend_strategy": "kSameAsRequested", "use_tf32": "0",
                                       "do_copy_in_default_stream": "1"}
    assert cuda_provider_options(tf32=True)["use_tf32"] == "1"


def test_only_cuda_gets_cuda_options_and_the_callers_options_win():
    assert with_provider_options([CUDA, CPU]) == [(CUDA, cuda_provider_options()), CPU]
    given = with_provider_options([(CUDA, {"device_id": "1", "use_tf32": "1"}), (CPU, {})], tf32=False)
    assert given == [(CUDA, {**cuda_provider_options(), "device_id": "1", "use_tf32": "1"}), (CPU, {})]
    assert with_provider_options([CUDA], tf32=True)[0][1]["use_tf32"] == "1"


def test_cpu_session_gets_the_options_and_computes_the_same(graph_path):
    session = open_session(graph_path, [CPU], quiet=True, threads=1)
    options = session.get_session_options()
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert not options.enable_mem_pattern and not options.enable_mem_reuse and options.enable_cpu_mem_arena
    assert options.intra_op_num_threads == 1 and options.log_severity_level == 3
    assert session.get_provider_options() == {CPU: {}}
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    for rows in (x, x[:1], np.tile(x, (5, 1))):  # new shapes after the first
        (y,) = session.run(None, {"x": rows})
        assert_relu_matmul(y, rows)


def test_profile_prefix_profiles_every_node_of_every_run(graph_path, tmp_path):
    session = open_session(graph_path, [CPU], quiet=True, profile_prefix=str(tmp_path / "run"))
    for rows in (1, 3):
        session.run(None, {"x": np.ones((rows, 4), dtype=np.float32)})
    profile = session.end_profiling()
    assert profile.startswith(str(tmp_path / "run"))
    with open(profile, encoding="utf-8") as handle:
        events = json.load(handle)
    kernels = [event["args"]["op_name"] for event in events if event.get("cat") == "Node"
               and event["name"].endswith("_kernel_time")]
    assert sorted(kernels) == ["MatMul", "MatMul", "Relu", "Relu"]


def test_shrink_run_option_names_the_arenas_the_session_has(graph_path):
    """Asked for CUDA, a session may run on the CPU (this build, or no GPU): the option names what it got, and
    ONNX Runtime accepts it at run time (it refuses an arena the session lacks, such as gpu:0 here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU build warns that it lacks CUDA
        session = open_session(graph_path, [CUDA, CPU], quiet=True)
    run_options = shrink_arena_run_options(session)
    on_cuda = CUDA in session.get_providers()
    expected = f"cpu:0;gpu:{session.get_provider_options()[CUDA]['device_id']}" if on_cuda else "cpu:0"
    assert run_options.get_run_config_entry(SHRINKAGE) == expected
    x = np.ones((2, 4), dtype=np.float32)
    for _ in range(2):
        (y,) = session.run(None, {"x": x}, run_options)
        assert_relu_matmul(y, x)
    if not on_cuda:
        wrong = onnxruntime.RunOptions()
        wrong.add_run_config_entry(SHRINKAGE, "cpu:0;gpu:0")
        with pytest.raises(Exception, match="gpu:0"):
            session.run(None, {"x": x}, wrong)
