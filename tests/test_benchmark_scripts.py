"""benchmarks/gpu_checks: its smallest configuration runs on the CPU, prints the summary table and writes
results.json and results.md, with transformers' reference rows and graph_cost's figures; the summary names the
card on every row, a missing transformers skips its rows with a note, a CUDA plan also times the graph with ONNX
Runtime's fused attention, a spent time budget skips what has not started with a note, the runtimes it times are
exporters.runners.Runner objects whose timed call runs what their `run` runs, and bad options fail in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from types import SimpleNamespace

import pytest

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPOSITORY_ROOT)  # `benchmarks` is a folder of scripts, not an installed package

import benchmarks.gpu_checks.steps  # noqa: E402
from benchmarks.gpu_checks.__main__ import parse_arguments  # noqa: E402
from benchmarks.gpu_checks.benchmark import benchmark_exports, benchmark_inputs, benchmark_mode  # noqa: E402
from benchmarks.gpu_checks.exports import Exports, export_file, export_key  # noqa: E402
from benchmarks.gpu_checks.plan import Plan, make_plan  # noqa: E402
from benchmarks.gpu_checks.report import Results, summary_header, summary_rows  # noqa: E402
from benchmarks.gpu_checks.timing import MIN_RUNS, time_interleaved  # noqa: E402
from benchmarks.gpu_checks.verification import verification_exports  # noqa: E402
from benchmarks.graph_cost import Cost, GraphCost  # noqa: E402
from benchmarks.models import build_model  # noqa: E402
from exporters.verification_report import VerificationRow  # noqa: E402
from rounding import rounding_bound  # noqa: E402


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    """The script on the CPU, also on a machine with a GPU (the CPU plan is what these tests check)."""
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_checks", *arguments], cwd=REPOSITORY_ROOT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=120, check=False)


QUICK_ARGUMENTS = ("--quick", "--models", "tiny", "--lengths", "32", "--checks", "verify,benchmark,cost",
                   "--threads", "1")


def largest_reference_bound(arguments, length: int) -> float:
    """The largest first-order rounding bound (tests/rounding.py, the reference's own rounding included) of the
    logits of the model and inputs the script benchmarks with these arguments at this length."""
    plan = make_plan(parse_arguments(["--out", "unused", *arguments]), cuda=False)
    model, _ = build_model("tiny", plan.max_length("tiny"))
    input_ids, attention_mask = benchmark_inputs(length, model.config.vocab_size)
    return float(rounding_bound(lambda: model(input_ids=input_ids, attention_mask=attention_mask).logits).max())


@pytest.mark.slow  # the GPU script end to end on the CPU, about 40 s on 2 cores; its parts have fast tests here
def test_quick_cpu_run_prints_the_table_and_writes_the_results(tmp_path):
    result = run_script("--out", str(tmp_path), *QUICK_ARGUMENTS)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(index for index, line in enumerate(lines) if line.split()[:2] == ["check", "model"])
    table = lines[header + 1:header + 4]
    assert [line.split()[:3] for line in table] == [["verify", "tiny", "1x1..1x256"], ["benchmark", "tiny", "1x32"],
                                                    ["cost", "tiny", "1x32"]]
    assert all("CPU" in line for line in table)  # the processor is named on every figure

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["complete"] and not results["errors"]
    assert results["environment"]["torch"] and "onnxruntime_providers_available" in results["environment"]
    assert {(row["runtime"], row["device"]) for row in results["verification"]} == {
        ("onnxruntime", "cpu"), ("torchscript", "cpu")}
    assert all(row["passed"] and row["replayed"] and row["replay_max_abs"] <= row["tolerance"]
               for row in results["verification"])
    benchmarks = {row["runtime"]: row for row in results["benchmarks"]}
    assert set(benchmarks) == {"eager", "onnxruntime", "torchscript", "transformers"}
    assert all(row["length"] == 32 and row["runs"] >= MIN_RUNS and row["median_ms"] > 0
               for row in benchmarks.values())
    assert benchmarks["onnxruntime"]["providers"] == ["CPUExecutionProvider"]
    # Free-running at the timed shape, as information (the verification rows carry the verdict): within the
    # verifier's own fp32 tolerance, and TorchScript bitwise (eager's own kernels in the same process).
    tolerance = min(row["tolerance"] for row in results["verification"])
    assert benchmarks["onnxruntime"]["max_abs"] <= tolerance and benchmarks["torchscript"]["max_abs"] == 0
    assert benchmarks["onnxruntime"]["flips"] == benchmarks["torchscript"]["flips"] == "-"  # deployment graphs
    # transformers' Reformer with our weights and config: the same function, to float rounding at most, its own
    # included. With two hashing rounds, its round weights round at the self-mask (README, "Where transformers
    # itself differs"), which the verifier's tolerance, eager against its own graph, leaves out: its largest gap
    # is within the largest first-order bound of the two evaluations at that shape (tests/rounding.py).
    assert benchmarks["transformers"]["max_abs"] <= largest_reference_bound(QUICK_ARGUMENTS, 32)
    assert benchmarks["transformers"]["flips"] == "-"
    (cost,) = results["cost"]  # graph_cost's figures at the benchmarked shape
    assert (cost["model"], cost["length"], cost["threads"]) == ("tiny", 32, 1)
    assert cost["graph_nodes"] >= cost["executed_nodes"] > 0 and cost["bytes_written"] > 0
    assert cost["onnxruntime_peak_bytes"] > 0 and cost["eager_peak_bytes"] > 0
    report = (tmp_path / "results.md").read_text()
    assert "## Benchmarks" in report and "| tiny | 32 | fp32 | transformers |" in report and "## Graph cost" in report


def test_runtimes_take_turns_between_warm_ups_and_timed_runs():
    calls = []
    runtimes = {name: (lambda name=name: calls.append(name)) for name in ("eager", "onnxruntime", "transformers")}
    times = time_interleaved(runtimes, "cpu", warmup=2, max_runs=5, min_runs=MIN_RUNS)
    # Every warm-up comes first, runtime by runtime; then each round runs every runtime once, in turn.
    assert calls[:6] == ["eager"] * 2 + ["onnxruntime"] * 2 + ["transformers"] * 2
    assert calls[6:] == ["eager", "onnxruntime", "transformers"] * 5
    assert all(len(runs) == 5 and all(ms >= 0 for ms in runs) for runs in times.values())


def test_summary_names_the_card_on_every_row(tmp_path):
    card = "NVIDIA H100 80GB HBM3"
    results = Results(tmp_path, "command", {"cuda_device": card}, {})
    check = {"max_abs": 1e-6, "flips": "0/1024"}
    for runtime in ("eager", "transformers", "onnxruntime", "torchscript"):
        row = {"runtime": runtime, "median_ms": 4.0, "min_ms": 3.9, "runs": 20, **({} if runtime == "eager" else check)}
        results.add_benchmark("small", 4096, "fp16", "cuda", row)
    speed = {"seconds": 1.0, "tokens_per_second": 128.0}
    results.add_generation("tiny", 1, "cuda", ["CUDAExecutionProvider"], {"eager": speed, "onnxruntime": speed,
                                                                            "same_tokens": True})
    cost = GraphCost(graph_nodes=551, executed_nodes=546, by_op={"MatMul": Cost(546, 2**30, 9)},
                     onnxruntime_peak_bytes=2**29, eager_peak_bytes=2**28)
    results.add_cost("small", 4096, 2, cost)
    rows = summary_rows(results)
    cpu = rows[-1][-1]
    assert cpu.startswith("CPU ")
    assert rows == [("benchmark", "small", "1x4096", "fp16 cuda", "4 ms", "4 ms", "4 ms", "4 ms", card),
                    ("generate", "tiny", "batch 1", "fp32 cuda", "128 tok/s", "128 tok/s, same tokens", "-", "-", card),
                    ("cost", "small", "1x4096", "fp32 cpu", "peak 0.25 GiB", "1 GiB written, 546 nodes, peak 0.5 GiB",
                     "-", "-", cpu)]


def test_the_fused_column_shows_only_when_a_run_timed_it(tmp_path):
    results = Results(tmp_path, "command", {"cuda_device": "NVIDIA H200"}, {})
    for runtime in ("eager", "onnxruntime", "onnxruntime-fused"):
        results.add_benchmark("small", 65536, "fp16", "cuda", {"runtime": runtime, "median_ms": 2.0})
    results.add_generation("tiny", 1, "cuda", [], {"eager": {"tokens_per_second": 9.0},
                                                    "onnxruntime": {"tokens_per_second": 9.0}, "same_tokens": True})
    assert summary_header(results)[4:] == ("eager", "onnxruntime", "torchscript", "transformers", "onnxruntime-fused",
                                           "card")
    assert summary_rows(results) == [
        ("benchmark", "small", "1x65536", "fp16 cuda", "2 ms", "2 ms", "-", "-", "2 ms", "NVIDIA H200"),
        ("generate", "tiny", "batch 1", "fp32 cuda", "9 tok/s", "9 tok/s, same tokens", "-", "-", "-", "NVIDIA H200")]
    results.benchmarks = [row for row in results.benchmarks if row["runtime"] != "onnxruntime-fused"]
    assert "onnxruntime-fused" not in summary_header(results) and len(summary_rows(results)[0]) == 9


def arguments_list(tmp_path) -> list[str]:
    return ["--out", str(tmp_path), "--checks", "benchmark", "--models", "small,large", "--lengths", "4096,65536"]


def test_a_cuda_plan_also_exports_and_times_the_fused_attention_graph_and_the_aoti_package(tmp_path):
    """Computed without a GPU: the runtimes and graphs the CUDA comparison's plan asks for."""
    arguments = parse_arguments(arguments_list(tmp_path))
    cuda, cpu = make_plan(arguments, cuda=True), make_plan(arguments, cuda=False)
    assert cuda.onnx_runtimes() == {"onnxruntime": "auto", "onnxruntime-fused": "ort",
                                    "onnxruntime-attention": "onnx-attention"}
    assert cpu.onnx_runtimes() == {"onnxruntime": "auto"}
    jobs = benchmark_exports(cuda)
    keys = {key for key, _ in jobs}
    # fp32 graphs exported on the CPU, fp16 on CUDA, each ONNX one with both lowerings; TorchScript traced and
    # AOTInductor packages compiled on CUDA.
    assert {(key.name, key.fmt, key.dtype, key.device, key.custom_ops) for key in keys} == {
        (name, fmt, dtype, device, custom_ops) for name in ("small", "large")
        for fmt, dtype, device, custom_ops in (
            ("onnx", "fp32", "cpu", "auto"), ("onnx", "fp32", "cpu", "ort"), ("onnx", "fp32", "cpu", "onnx-attention"),
            ("onnx", "fp16", "cuda", "auto"), ("onnx", "fp16", "cuda", "ort"), ("onnx", "fp16", "cuda", "onnx-attention"),
            ("torchscript", "fp32", "cuda", "auto"),
            ("torchscript", "fp16", "cuda", "auto"), ("aoti", "fp32", "cuda", "auto"), ("aoti", "fp16", "cuda", "auto"))}
    assert not any(key.replay for key in keys) and {length for _, length in jobs} == {65536}
    exports = Exports(tmp_path, Results(tmp_path, "command", {"cuda_device": None}, {}))
    assert len({exports.path_for(key) for key in keys}) == len(keys)  # a file each
    assert {exports.path_for(key).suffix for key in keys if key.fmt == "aoti"} == {".pt2"}
    # The CPU plan keeps its two graphs, the default ONNX lowering only; packages (a compile each) on request.
    assert {(key.name, key.fmt, key.custom_ops) for key, _ in benchmark_exports(cpu)} == {
        ("small", "onnx", "auto"), ("small", "torchscript", "auto")}
    with_packages = make_plan(parse_arguments([*arguments_list(tmp_path), "--aoti"]), cuda=False)
    assert {(key.name, key.fmt, key.device) for key, _ in benchmark_exports(with_packages)} == {
        ("small", "onnx", "cpu"), ("small", "torchscript", "cpu"), ("small", "aoti", "cpu")}


def test_packages_are_verified_in_fp16_on_cuda_and_in_fp32_on_the_cpu(tmp_path):
    arguments = parse_arguments(["--out", str(tmp_path), "--checks", "verify", "--models", "small"])
    packages = {(key.fmt, key.dtype, key.device, key.replay) for key, _ in verification_exports(
        make_plan(arguments, cuda=True)) if key.fmt == "aoti"}
    assert packages == {("aoti", "fp16", "cuda", False), ("aoti", "fp16", "cuda", True)}
    assert not [key for key, _ in verification_exports(make_plan(arguments, cuda=False)) if key.fmt == "aoti"]
    with_packages = make_plan(parse_arguments(["--out", str(tmp_path), "--checks", "verify", "--models", "small",
                                               "--aoti"]), cuda=False)
    assert {(key.fmt, key.dtype, key.device, key.replay) for key, _ in verification_exports(with_packages)
            if key.fmt == "aoti"} == {("aoti", "fp32", "cpu", False), ("aoti", "fp32", "cpu", True)}


def test_a_cuda_plan_verifies_both_fused_lowerings_in_fp16_and_labels_their_rows(tmp_path, monkeypatch):
    arguments = parse_arguments(["--out", str(tmp_path), "--checks", "verify", "--models", "small"])
    fused = {(key.fmt, key.dtype, key.device, key.replay, key.custom_ops) for key, _ in verification_exports(
        make_plan(arguments, cuda=True)) if key.custom_ops != "auto"}
    assert fused == {("onnx", "fp16", "cuda", replay, custom_ops) for replay in (False, True)
                     for custom_ops in ("ort", "onnx-attention")}
    assert not [key for key, _ in verification_exports(make_plan(arguments, cuda=False)) if key.custom_ops != "auto"]
    # The ONNX Attention graphs are exported at opset 23, the others at the default opset.
    opsets = {}
    monkeypatch.setattr("exporters.onnx.export_onnx",
                        lambda *_, custom_ops, opset, **__: opsets.__setitem__(custom_ops, opset))
    for custom_ops in ("auto", "ort", "onnx-attention"):
        export_file(None, None, export_key("small", "onnx", "fp16", "cuda", custom_ops=custom_ops), tmp_path / "x")
    assert opsets == {"auto": 18, "ort": 18, "onnx-attention": 23}
    results = Results(tmp_path, "command", {"cuda_device": "NVIDIA H200"}, {})
    row = VerificationRow("onnxruntime-cuda", "cuda", (1, 4096), "fp16", passed=True)
    for custom_ops in ("auto", "onnx-attention"):
        results.add_verification("small", "fp16", SimpleNamespace(rows=[row], skipped=[]), custom_ops)
    assert [summary[3] for summary in summary_rows(results)] == ["fp16 cuda", "fp16 cuda custom_ops=onnx-attention"]


def test_graph_cost_times_lowerings_only_for_known_distinct_modes(tmp_path):
    for arguments, message in ((["--time-lowerings", "standard,fast"], "not fast"),
                               (["--time-lowerings", "ort,ort"], "name distinct modes"),
                               (["--model", "tiny", "--num-hashes", "2"], "applies to small and large only")):
        result = subprocess.run([sys.executable, "-m", "benchmarks.graph_cost", *arguments], cwd=REPOSITORY_ROOT,
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_spent_time_budget_skips_every_check_with_a_note(tmp_path):
    result = run_script("--out", str(tmp_path), "--models", "tiny", "--checks", "verify,benchmark,generation,cost",
                        "--budget-minutes", "0")
    assert result.returncode == 0, result.stderr[-3000:]  # notes, not failures
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["complete"] and not results["errors"] and results["plan"]["budget_minutes"] == 0
    assert not (results["verification"] or results["benchmarks"] or results["generation"] or results["cost"]
                or results["exports"])
    spent = "skipped, time budget of 0 minutes spent"
    assert [note for note in results["notes"] if spent in note] == [
        f"{step}: {spent}" for step in ("exports", "verify tiny", "generation tiny", "benchmark tiny", "cost tiny 256")]
    assert f"- cost tiny 256: {spent}" in (tmp_path / "results.md").read_text()


def test_a_benchmark_length_not_started_by_the_deadline_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # eager's rows are enough here
    model, spec = build_model("tiny", 256)
    plan = Plan(device="cpu", models=["tiny"], checks=["benchmark"], lengths={"tiny": (16, 32)}, modes=("fp32",),
                warmup=1, max_runs=MIN_RUNS, generation_repeats=1, threads=1, budget_minutes=1)
    results = Results(tmp_path, "command", {"cuda_device": None}, {})
    # The minute is spent once the first length has its row.
    monkeypatch.setattr(benchmarks.gpu_checks.steps, "seconds_since_start", lambda: 61.0 if results.benchmarks else 0.0)
    benchmark_mode("tiny", model, spec, "fp32", plan, NoExports(), results)
    assert [(row["runtime"], row["length"]) for row in results.benchmarks] == [("eager", 16)]
    assert "benchmark tiny fp32 32: skipped, time budget of 1 minutes spent" in results.notes


class NoExports:
    """For tests about the runtimes that need no export: the exported ones fail, and are recorded so."""

    def get(self, *arguments, **keywords):
        raise RuntimeError("no exports in this test")


def test_without_transformers_its_rows_are_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError

    model, spec = build_model("tiny", 256)
    plan = Plan(device="cpu", models=["tiny"], checks=["benchmark"], lengths={"tiny": (32,)}, modes=("fp32",),
                warmup=1, max_runs=MIN_RUNS, generation_repeats=1, threads=1)
    results = Results(tmp_path, "command", {"cuda_device": None}, {})
    benchmark_mode("tiny", model, spec, "fp32", plan, NoExports(), results)
    assert [row["runtime"] for row in results.benchmarks] == ["eager"]
    assert any(note.startswith("benchmark tiny fp32 transformers: skipped, not importable") for note in results.notes)
    assert not any("transformers" in error for error in results.errors)


def test_benchmark_runtimes_are_runners_whose_prepared_call_runs_what_run_runs(tmp_path):
    """Every runtime a benchmark times is an exporters.runners.Runner; its prepared call (what is timed) gives
    the outputs its `run` gives (ONNX Runtime on the CPU: session.run on numpy feeds made once). The ONNX graph
    is a stand-in (ids plus mask), so that no export is paid for here."""
    import onnx
    import torch
    from onnx import TensorProto, helper

    from benchmarks.gpu_checks.benchmark import benchmark_inputs
    from benchmarks.gpu_checks.runners import open_onnx
    from benchmarks.gpu_checks.steps import RuntimeUnavailable
    from exporters.runners import module_runner, module_weight_bytes, onnxruntime_providers

    model, spec = build_model("tiny", 32)
    inputs = list(benchmark_inputs(32, model.config.vocab_size))
    graph_inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, [1, "length"])
                    for name in ("input_ids", "attention_mask")]
    graph = helper.make_graph([helper.make_node("Add", ["input_ids", "attention_mask"], ["sum"])], "stand-in",
                              graph_inputs, [helper.make_tensor_value_info("sum", TensorProto.INT64, [1, "length"])])
    path = tmp_path / "stand-in.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    graph_runner = open_onnx(path, "cpu", threads=1)
    assert graph_runner.providers == ["CPUExecutionProvider"] and graph_runner.weight_bytes is None
    (expected,) = graph_runner.run(inputs)
    assert torch.equal(expected, inputs[0] + 1)
    assert torch.equal(torch.from_numpy(graph_runner.prepared_call(inputs)()[0]), expected)
    wrapper = spec.wrap(model)
    eager = module_runner(wrapper, "cpu", tf32=False)
    assert eager.providers == [] and eager.weight_bytes == module_weight_bytes(model) > 0
    with torch.no_grad():
        assert torch.equal(eager.prepared_call(inputs)()[0], eager.run(inputs)[0])
    if "CUDAExecutionProvider" not in onnxruntime_providers():
        with pytest.raises(RuntimeUnavailable, match="onnxruntime lists no CUDAExecutionProvider"):
            open_onnx(path, "cuda")


@pytest.mark.parametrize("arguments, message", [
    (["--models", "huge"], "choose from tiny, small, large"),
    (["--checks", "speed"], "choose from verify, benchmark, generation, cost"),
    (["--lengths", "0"], "--lengths must be positive"),
    (["--budget-minutes", "-1"], "--budget-minutes must be 0 or more"),
])
def test_bad_options_fail_in_one_line(tmp_path, arguments, message):
    result = run_script("--out", str(tmp_path / "out"), *arguments)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a refused run


def test_serving_benchmark_refuses_fewer_requests_than_clients_in_one_line():
    """benchmarks.serving runs a real server (results/cpu-2026-11-30-serving.md); its options fail before that."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--clients", "4", "--requests", "2"],
                            cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "serving.py: error: every --clients must be at least 1, and --requests at least the largest (see --help)"]


@pytest.mark.parametrize("arguments, message", [
    (["--duration", "0"], "--duration and --sample-seconds must be positive"),
    (["--malformed-every", "1"], "--clients must be at least 1 and --malformed-every at least 2"),
    (["--repository", "no/such/folder"], "--repository no/such/folder is not a directory"),
])
def test_soak_bad_options_fail_in_one_line(arguments, message, capsys):
    """benchmarks.soak runs a real server for minutes (tests/exporters/test_triton_server.py runs one minute of
    it); its options fail before anything starts."""
    from benchmarks.soak import parse_arguments as soak_arguments

    with pytest.raises(SystemExit) as exit_info:
        soak_arguments(arguments)
    errors = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(errors) == 1 and errors[0].endswith(f": error: {message} (see --help)")


def test_soak_verdict_names_each_missed_criterion():
    from benchmarks.soak import (ERROR, FORWARD, GENERATION, MALFORMED, RIGHT, WRONG, Load, MemorySample, failures,
                                 summary_lines)

    mib = 2**20
    records = [(FORWARD, "http", RIGHT, 0.01), (GENERATION, "grpc", RIGHT, 0.2), (MALFORMED, "grpc", RIGHT, 0.01)]
    memory = [MemorySample(0.0, 1.0, {"tritonserver": 50 * mib}, 0),
              MemorySample(60.0, 1.0, {"tritonserver": 100 * mib, "model": 100 * mib}, mib),
              MemorySample(600.0, 1.0, {"tritonserver": 105 * mib, "model": 114 * mib}, mib)]
    warm_up = MemorySample(20.0, 1.0, {"tritonserver": 90 * mib, "model": 100 * mib}, mib)
    passed = Load(records=records, memory=memory, warm_up=warm_up)
    assert failures(passed, stop_status=0) == []
    assert summary_lines(passed, 0)[1:] == ["resident memory: 200 MiB after the first minute, 219 MiB at the end, "
                                            "growth +9.5% (limit 10%)", "verdict: passed"]
    failed = Load(records=records + [(GENERATION, "http", WRONG, 0.1), (FORWARD, "grpc", ERROR, 0.1),
                                     (MALFORMED, "http", WRONG, 0.01), (MALFORMED, "grpc", ERROR, 0.01)],
                  memory=memory[:2] + [MemorySample(600.0, 1.0, {"tritonserver": 120 * mib, "model": 100 * mib}, mib)],
                  warm_up=warm_up, unanswered=1)
    assert failures(failed, stop_status=1) == [
        "1 errors and 1 wrong answers on valid requests",
        "2 of 3 malformed requests not refused with their error",
        "1 clients still waiting for an answer 60 s after the end",
        "reformer-serve did not serve to the end and stop cleanly: exit status 1",
        "the server's resident memory grew 10.0% after the first minute (limit 10%)"]
    short = Load(records=records, memory=memory[:2])  # the first minute is all there is: memory is not judged
    assert failures(short, stop_status=0) == [] and "not judged" in summary_lines(short, 0)[1]


def test_soak_judges_memory_from_the_end_of_its_warm_up():
    """The baseline is the first sample after the first minute and after the warm-up (each model's largest batch,
    so that the arenas' high-water marks come before it); a long run whose warm-up never finished fails."""
    from benchmarks.soak import GENERATION, TASK, Load, MemorySample, failures, memory_rows, summary_lines

    mib = 2**20
    memory = [MemorySample(seconds, 1.0, {"tritonserver": total * mib}, 0)
              for seconds, total in ((0.0, 100), (60.0, 150), (70.0, 200), (300.0, 210), (600.0, 215))]
    late = Load(memory=memory, warm_up=MemorySample(65.0, 1.0, {"tritonserver": 190 * mib}, 0))
    assert failures(late, stop_status=0) == []
    assert summary_lines(late, 0)[1] == ("resident memory: 200 MiB after the warm-up (70 s), 215 MiB at the end, "
                                         "growth +7.5% (limit 10%)")
    assert [row[0] for row in memory_rows(late, {TASK: "task", GENERATION: "generation"}, 600.0)] == [
        "0", "60", "65 (warm-up done)", "70", "300", "600"]  # the samples nearest to each minute, in time order
    unfinished = Load(memory=memory)
    assert failures(unfinished, stop_status=0) == [
        "the warm-up did not finish before the last memory sample: the memory growth is not judged"]
    assert summary_lines(unfinished, 0)[1] == ("resident memory: not judged, the warm-up did not finish before the "
                                               "last sample")

def test_kernel_sweep_counts_moved_comparisons_and_planted_defects():
    """benchmarks/kernel_sweep: a comparison moves when its largest gap differs from the first setting's; the
    closest approach to a bound leaves out comparisons outside it, which are counted on their own."""
    from benchmarks.kernel_sweep import tables

    def run(setting, gaps_and_ratios):
        records = [{"test": f"tests/test_{name}.py::case", "label": name, "gap": gap, "ratio": ratio}
                   for name, (gap, ratio) in gaps_and_ratios.items()]
        return {"setting": setting, "summary": "2 passed", "seconds": 1.0, "records": records}

    first = run("as is", {"a": (1e-7, 0.1), "b": (0.0, 0.0), "planted": (1e-3, 50.0)})
    other = run("aten default", {"a": (2e-7, 0.2), "b": (0.0, 0.0), "planted": (1e-3, 50.0)})
    header, rows, _, module_rows = tables([first, other])
    by_column = [dict(zip(header, row)) for row in rows]
    assert [row["moved"] for row in by_column] == [0, 1] and by_column[1]["largest move"] == "1e-07"
    assert [row["largest gap/bound within"] for row in by_column] == ["0.1", "0.2"]
    assert [row["outside (planted)"] for row in by_column] == [1, 1]
    assert dict(module_rows)["tests/test_a.py"] == "aten default" and dict(module_rows)["tests/test_b.py"] == "none"


def test_cpu_speed_tables_compare_each_runtime_with_the_reference_at_its_own_shape():
    """benchmarks/cpu_speed: speed-ups are taken against transformers and ONNX Runtime fp32 at the same threads
    and length (or model and batch), never across shapes; memory against transformers' median peak."""
    from benchmarks.cpu_speed import Files, forward_table, generation_table, memory_table

    def forward_row(threads, length, runtime, milliseconds, **difference):
        return {"threads": threads, "length": length, "runtime": runtime, "median_ms": milliseconds,
                "min_ms": milliseconds, "runs": 5, **difference}

    rows = [forward_row(1, 4096, "transformers", 600.0, relative=1e-7, top1=1.0), forward_row(1, 4096, "eager", 400.0),
            forward_row(1, 4096, "onnxruntime fp32", 240.0, relative=2e-7, top1=1.0),
            forward_row(1, 4096, "onnxruntime int8", 120.0, relative=5e-3, top1=0.97),
            forward_row(2, 4096, "transformers", 300.0), forward_row(2, 4096, "onnxruntime int8", 100.0)]
    files = Files("small", 4096, 258, megabytes={"onnxruntime fp32": 4.0, "onnxruntime int8": 1.5})
    header, table = forward_table(rows, files)
    cells = [dict(zip(header, row)) for row in table]
    assert [cell["speed-up vs transformers"] for cell in cells] == ["1.00x", "1.50x", "2.50x", "5.00x", "1.00x", "3.00x"]
    assert [cell["vs ORT fp32"] for cell in cells] == ["0.40x", "0.60x", "1.00x", "2.00x", "-", "-"]
    assert cells[3]["top-1 agree"] == "97.00%" and cells[3]["file MB"] == "1.50" and cells[1]["max diff / eager's max"] == "-"

    memory = [{"runtime": runtime, "loaded_bytes": 2**29, "peak_bytes": peak * 2**30, "seconds": 2.0}
              for runtime, peak in (("transformers", 1.2), ("transformers", 1.4), ("transformers", 1.3),
                                    ("onnxruntime fp32", 1.0))]
    header, table = memory_table(memory)
    cells = {row[0]: dict(zip(header, row)) for row in table}
    assert cells["transformers"]["peak resident GiB (median)"] == "1.300" and cells["transformers"]["processes"] == 3
    assert cells["transformers"]["range"] == "1.200 to 1.400"
    assert cells["onnxruntime fp32"]["peak vs transformers"] == "0.77x"

    generation = [{"model": "byte-lm", "batch": 1, "runtime": runtime, "seconds": 1.0, "tokens_per_second": rate,
                   "runs": 3, "same_tokens": "yes"}
                  for runtime, rate in (("transformers", 100.0), ("onnxruntime fp32", 500.0), ("onnxruntime int8", 700.0))]
    header, table = generation_table(generation)
    assert [dict(zip(header, row))["vs ORT fp32"] for row in table] == ["0.20x", "1.00x", "1.40x"]
    assert [dict(zip(header, row))["vs transformers"] for row in table] == ["1.00x", "5.00x", "7.00x"]


def test_cpu_speed_says_which_rows_differ_from_eager_and_where():
    import numpy as np

    from benchmarks.cpu_speed import token_agreement

    expected = np.array([[7, 7, 1, 2, 3], [7, 7, 4, 5, 6], [7, 7, 8, 9, 9]])
    assert token_agreement(expected, expected.copy(), prompt_length=2) == "yes"
    actual = expected.copy()
    actual[1, 4], actual[2, 3] = 0, 0
    assert token_agreement(expected, actual, prompt_length=2) == "no: 2 of 3 rows, first at new token 2"


@pytest.mark.slow
def test_cpu_speed_runs_every_part_on_the_tiny_model_and_writes_its_tables(tmp_path):
    """The whole script at the smallest sizes (no AOTInductor compile). Slow: about 60 s on 2 cores, most of it
    the worker processes' imports; the default run tests its tables and options."""
    out = tmp_path / "speed.md"
    result = subprocess.run([sys.executable, "-m", "benchmarks.cpu_speed", "--model", "tiny", "--lengths", "32",
                             "--threads", "1", "--memory-length", "64", "--memory-rounds", "1", "--generation-models",
                             "tiny", "--batches", "2", "--prompt-length", "8", "--new-tokens", "4", "--no-aoti",
                             "--out", str(out)], cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "- processor: " in text and "- load average" in text and "--model tiny" in text
    runtimes = ("transformers", "eager", "onnxruntime fp32", "onnxruntime int8")
    for section, rows in (("## Forward", 4), ("## Memory", 4), ("## Greedy generation", 4)):
        table = text.split(section)[1].split("##")[0]
        assert sum(line.startswith("| ") for line in table.splitlines()) == rows + 2, table  # header, rule, rows
        assert all(f"| {runtime} |" in table for runtime in runtimes), table
    generation = text.split("## Greedy generation")[1]
    assert generation.count("| yes |") >= 3  # eager, and both fp32 runtimes generate eager's tokens


@pytest.mark.parametrize("arguments, message", [
    (["--parts", "speed"], "unknown part speed: choose from forward, memory, generation"),
    (["--threads", "0"], "thread counts and lengths must be at least 1"),
])
def test_cpu_speed_bad_options_fail_in_one_line(arguments, message):
    result = subprocess.run([sys.executable, "-m", "benchmarks.cpu_speed", *arguments], cwd=REPOSITORY_ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
