"""AOTInductor packages (.pt2) against eager, for every task on the tiny configs.

Packages are exported at batch 2 and one length (exporters.specs.example_length) and run at other batch sizes and
at length 1, lengths below one chunk, odd lengths and the maximum, with padded masks; every package here runs with
AOTI_RUNTIME_CHECK_INPUTS=1, so it also checks each input's shape against the ranges it was compiled for.

Tolerance: the first-order rounding bound of eager's computation, element by element (tests/rounding.py).
Inductor fuses and reorders float operations, so unlike TorchScript the package is not bitwise equal to eager;
measured differences on these models are below 1e-6. Per-position outputs are compared where the mask keeps
the position (tests/reformer/test_parity.py); buckets must agree exactly there (no near-ties at these inputs:
the verifier's twin covers those, tested below).

Cost: one compile takes 15 to 150 s on 2 cores, more with more LSH layers and rounds (Inductor's C++ code
generation simplifies the symbolic index expressions of the dynamic shapes; pytorch/pytorch#186319). The default
run compiles two packages: one config with LSH and local layers (task base), shared by every test through a
module-scoped fixture, and its verification twin (about 65 s in all on an idle 2-core machine). Every other
(task, config) pair of the table is marked slow: 29 more compiles, 30 minutes."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import zipfile

import pytest
import torch

from exporters import aoti
from exporters.aoti import export_aoti, load_metadata, load_package, package_metadata
from exporters.errors import ExportError
from exporters.specs import TASKS, example_length
from exporters.torchscript import METADATA_NAME
from exporters.verify import verify_export
from graph_checks import assert_graph_matches_eager
from tiny_configs import build, make_inputs, task_configs

SHARED = ("base", "lm_mixed")  # task and config of the package the default run compiles (LSH and local layers)
TABLE = [pytest.param(task, name, values, id=f"{task}-{name}",
                      # Slow: a compile each (15 to 150 s); the shared package covers the default run.
                      marks=() if (task, name) == SHARED else pytest.mark.slow)
         for task in TASKS for name, values in task_configs(task)]


@pytest.fixture(scope="module")
def checked_shapes():
    """Packages check their inputs' shapes (read by each package when it first runs, so set for the module)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AOTI_RUNTIME_CHECK_INPUTS", "1")
        yield


@pytest.fixture(scope="module")
def shared_package(tmp_path_factory, checked_shapes):
    """(model, path) of the SHARED config exported with bucket outputs, compiled once for the module."""
    task, name = SHARED
    model, path = build(task, dict(task_configs(task))[name]), str(tmp_path_factory.mktemp("aoti") / "base.pt2")
    export_aoti(model, TASKS[task], path, with_buckets=True, metadata={"model_name": "tiny-base"})
    return model, path


def assert_matches_eager(task: str, model, path: str) -> None:
    config = model.config
    exported_length = example_length(config.padding_multiple, config.max_position_embeddings)
    shapes = [(1, 1), (3, 1), (1, 3), (3, 11), (4, config.max_position_embeddings)]
    assert all(shape != (2, exported_length) for shape in shapes)
    assert_graph_matches_eager(TASKS[task], model, "aoti", path, shapes)


@pytest.mark.parametrize("task,name,values", TABLE)
def test_package_matches_eager_at_other_shapes(task, name, values, tmp_path, checked_shapes, request):
    if (task, name) == SHARED:
        model, path = request.getfixturevalue("shared_package")
    else:
        model, path = build(task, values), str(tmp_path / "model.pt2")
        export_aoti(model, TASKS[task], path, with_buckets=True)
    assert_matches_eager(task, model, path)


def test_package_refuses_a_sequence_past_max_length(shared_package):
    model, path = shared_package
    input_ids, attention_mask = make_inputs(1, model.config.max_position_embeddings + 1)
    with pytest.raises(RuntimeError, match="dim value is too large"):
        load_package(path)(input_ids, attention_mask)


def test_metadata_describes_the_package(shared_package):
    model, path = shared_package
    config, lsh_layers = model.config, model.config.attn_layers.count("lsh")
    metadata = load_metadata(path)
    assert metadata["format"] == "aoti" and metadata["task"] == "base" and metadata["device"] == "cpu"
    assert metadata["input_names"] == ["input_ids", "attention_mask"]
    assert metadata["output_names"] == ["last_hidden_state"] + [f"buckets_{i}" for i in range(lsh_layers)]
    assert metadata["dynamic_axes"]["input_ids"] == {"0": "batch_size", "1": "sequence_length"}
    assert metadata["hash_seed"] == config.resolved_hash_seed and metadata["with_buckets"]
    assert metadata["max_length"] == config.max_position_embeddings
    assert metadata["export_shape"] == [2, example_length(config.padding_multiple, config.max_position_embeddings)]
    assert metadata["config"] == config.to_dict() and metadata["model_name"] == "tiny-base"
    assert metadata["cpu_march"] == aoti.PORTABLE_MARCH and metadata["program_ops"]["aten.linear.default"] > 0
    # What a host reads: the loaded package's metadata (AOTIModelPackageLoader::get_metadata) holds the same entry.
    runtime_metadata = load_package(path).get_metadata()
    assert runtime_metadata[METADATA_NAME] == package_metadata(path)[METADATA_NAME]
    assert runtime_metadata["AOTI_DEVICE_KEY"] == "cpu"


@pytest.mark.skipif(platform.machine() not in aoti.X86_MACHINES, reason="the portable target is x86-64's")
def test_default_package_runs_without_avx512(shared_package, tmp_path):
    _, path = shared_package
    assert "AVX512" not in package_metadata(path)["AOTI_CPU_ISA"]
    # The compiler's target matters as much as Inductor's vector ISA (-march=native would let it emit AVX-512
    # anywhere): no instruction of the library may touch a 512-bit register.
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    with zipfile.ZipFile(path) as archive:
        libraries = [name for name in archive.namelist() if name.endswith(".so")]
        assert libraries
        archive.extractall(tmp_path, libraries)
    for name in libraries:
        disassembly = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(tmp_path / name)],
                                     capture_output=True, text=True, check=True).stdout
        assert "ymm" in disassembly  # vectorised at 256 bits: the check below looks at real kernels
        assert "zmm" not in disassembly, f"{name} uses AVX-512 registers"


def test_verification_replays_lsh_buckets_through_the_twin(shared_package, tmp_path):
    model, path = shared_package
    twin = str(tmp_path / "twin.pt2")
    export_aoti(model, TASKS["base"], twin, replay=True)
    config = model.config
    shapes = [(1, 1), (3, 11), (2, config.max_position_embeddings)]
    report = verify_export(model, TASKS["base"], path, "aoti", twin_path=twin, shapes=shapes)
    assert report.passed, report.summary_table()
    assert [row.shape for row in report.rows] == shapes and all(row.replayed for row in report.rows)
    assert all(row.replay_max_abs <= row.tolerance and row.total_buckets > 0 for row in report.rows)
    assert report.twin_extra_nodes and not report.twin_missing_nodes
    if not torch.cuda.is_available():
        assert report.skipped == ["aoti-cuda: torch sees no CUDA device"]


def test_a_cpu_package_is_not_run_on_cuda(shared_package):
    """A package runs on the device it was compiled for; verification says so instead of failing."""
    _, path = shared_package
    if torch.cuda.is_available():
        from exporters.aoti import open_runner

        assert open_runner(path, "cuda") == (None, "the package is compiled for cpu")
    assert package_metadata(path)["AOTI_DEVICE_KEY"] == "cpu"


def test_package_name_must_end_in_pt2(tmp_path):
    _, values = task_configs("base")[0]
    with pytest.raises(ExportError, match=r"must end in \.pt2"):
        export_aoti(build("base", values), TASKS["base"], str(tmp_path / "model.pt"))
    assert os.listdir(tmp_path) == []


def test_portable_target_is_refused_off_x86(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(ExportError, match="--native-isa"):
        aoti.cpu_march(native_isa=False)
    assert aoti.cpu_march(native_isa=True) == aoti.NATIVE_MARCH


def test_without_the_compilers_target_option_only_the_native_target_is_offered(monkeypatch):
    """torch 2.11 (the GPU machines' version) has no Inductor option for the compiler's target."""
    monkeypatch.delattr(torch._inductor.config.cpp, "march")
    with pytest.raises(ExportError, match="--native-isa, or use torch 2.13"):
        aoti.cpu_march(native_isa=False)
    assert aoti.cpu_march(native_isa=True) == aoti.NATIVE_MARCH


def test_metadata_is_read_from_the_archive_where_torch_has_no_reader(shared_package, monkeypatch):
    """torch 2.11's loader has no load_metadata_from_package: the archive's own metadata file gives the same."""
    _, path = shared_package
    expected = package_metadata(path)
    monkeypatch.delattr(torch._C._aoti.AOTIModelPackageLoader, "load_metadata_from_package")
    assert package_metadata(path) == expected and METADATA_NAME in expected
    with pytest.raises(ExportError, match="cannot read the metadata of step"):
        package_metadata(path, "step")


@pytest.mark.parametrize("package_isa,dropped", [("AVX2", True), ("INVALID_VEC_ISA", True), ("NO_SUCH_ISA", False)])
def test_isa_mismatch_warning_is_dropped_only_for_an_isa_this_cpu_runs(package_isa, dropped):
    import logging

    record = logging.LogRecord(aoti.ISA_MISMATCH_LOGGER, logging.WARNING, __file__, 0,
                               "Device information mismatch for %s: %s vs %s. More.", ("AOTI_CPU_ISA", "AVX512",
                                                                                        package_isa), None)
    if package_isa == "AVX2" and not torch.cpu._is_avx2_supported():
        pytest.skip("this CPU has no AVX2")
    assert aoti.RunnableIsaMismatchFilter().filter(record) is not dropped


@pytest.mark.cuda
def test_fp16_cuda_package_verifies(tmp_path):
    task, (_, values) = "causal-lm", task_configs("causal-lm")[0]
    model = build(task, values)
    path, twin = str(tmp_path / "model.pt2"), str(tmp_path / "twin.pt2")
    export_aoti(model, TASKS[task], path, dtype="fp16", device="cuda")
    export_aoti(model, TASKS[task], twin, dtype="fp16", device="cuda", replay=True)
    assert package_metadata(path)["AOTI_DEVICE_KEY"] == "cuda" and load_metadata(path)["dtype"] == "fp16"
    report = verify_export(model, TASKS[task], path, "aoti", twin_path=twin, dtype="fp16", device="cuda")
    assert report.passed and {row.device for row in report.rows} == {"cuda"}, report.summary_table()
