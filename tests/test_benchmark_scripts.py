"""benchmarks/gpu_checks.py: its smallest configuration runs on the CPU, prints the summary table and writes
results.json and results.md; the summary names the card on every row, and bad options fail in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPOSITORY_ROOT)  # `benchmarks` is a folder of scripts, not an installed package

from benchmarks import gpu_checks  # noqa: E402


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    """The script on the CPU, also on a machine with a GPU (the CPU plan is what these tests check)."""
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_checks", *arguments], cwd=REPOSITORY_ROOT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=120, check=False)


def test_quick_cpu_run_prints_the_table_and_writes_the_results(tmp_path):
    result = run_script("--out", str(tmp_path), "--quick", "--models", "tiny", "--lengths", "32",
                        "--checks", "verify,benchmark", "--threads", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(index for index, line in enumerate(lines) if line.split()[:2] == ["check", "model"])
    table = lines[header + 1:header + 3]
    assert [line.split()[:3] for line in table] == [["verify", "tiny", "1x1..1x256"], ["benchmark", "tiny", "1x32"]]
    assert all("CPU" in line for line in table)  # the processor is named on every figure

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["complete"] and not results["errors"]
    assert results["environment"]["torch"] and "onnxruntime_providers_available" in results["environment"]
    assert {(row["runtime"], row["device"]) for row in results["verification"]} == {
        ("onnxruntime", "cpu"), ("torchscript", "cpu")}
    assert all(row["passed"] and row["replayed"] and row["replay_max_abs"] <= row["tolerance"]
               for row in results["verification"])
    benchmarks = {row["runtime"]: row for row in results["benchmarks"]}
    assert set(benchmarks) == {"eager", "onnxruntime", "torchscript"}
    assert all(row["length"] == 32 and row["runs"] >= gpu_checks.MIN_RUNS and row["median_ms"] > 0
               for row in benchmarks.values())
    assert benchmarks["onnxruntime"]["providers"] == ["CPUExecutionProvider"]
    # Free-running at the timed shape, as information (the verification rows carry the verdict).
    assert benchmarks["onnxruntime"]["max_abs"] <= 1e-5 and benchmarks["torchscript"]["max_abs"] == 0
    assert benchmarks["onnxruntime"]["flips"] == benchmarks["torchscript"]["flips"] == "-"  # deployment graphs
    assert "## Benchmarks" in (tmp_path / "results.md").read_text()


def test_summary_names_the_card_on_every_row(tmp_path):
    card = "NVIDIA H100 80GB HBM3"
    results = gpu_checks.Results(tmp_path, "command", {"cuda_device": card}, {})
    check = {"max_abs": 1e-6, "flips": "0/1024"}
    for runtime in ("eager", "onnxruntime", "torchscript"):
        row = {"runtime": runtime, "median_ms": 4.0, "min_ms": 3.9, "runs": 20, **({} if runtime == "eager" else check)}
        results.add_benchmark("small", 4096, "fp16", "cuda", row)
    speed = {"seconds": 1.0, "tokens_per_second": 128.0}
    results.add_generation("tiny", 1, "cuda", ["CUDAExecutionProvider"], {"eager": speed, "onnxruntime": speed,
                                                                            "same_tokens": True})
    rows = gpu_checks.summary_rows(results)
    assert rows == [("benchmark", "small", "1x4096", "fp16 cuda", "4 ms", "4 ms", "4 ms", card),
                    ("generate", "tiny", "batch 1", "fp32 cuda", "128 tok/s", "128 tok/s, same tokens", "-", card)]


@pytest.mark.parametrize("arguments, message", [
    (["--models", "huge"], "choose from tiny, small, large"),
    (["--checks", "speed"], "choose from verify, benchmark, generation"),
    (["--lengths", "0"], "--lengths must be positive"),
])
def test_bad_options_fail_in_one_line(tmp_path, arguments, message):
    result = run_script("--out", str(tmp_path / "out"), *arguments)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a refused run
