"""The test suite under the kernel and thread choices the libraries expose, and which numbers each one moves.

    python -m benchmarks.kernel_sweep [--out FILE.md] [--tests PATH ...] [--settings NAME,...]

(from the repository root). Runs pytest once per setting, each in a fresh process with its environment
variables (torch and MKL read theirs when they load), every float comparison writing its largest gap and
gap / bound to a file (tests/rounding.py, REPORT_VARIABLE). Then prints, per setting: the tests passed and
failed, the comparisons made, how many of them moved against the first setting (same test and label, another
largest gap), the largest move, the largest gap / bound of the comparisons within their bound (how close any
came), and how many were outside it (the tests that plant a defect to show the bound catches it, the same in
every setting); and, per test module, which settings moved its numbers.

The settings: torch's vectorised CPU kernels for AVX-512 (on this machine), AVX2 and no vector extension
(ATEN_CPU_CAPABILITY), MKL's matrix products for AVX2 (MKL_ENABLE_INSTRUCTIONS), and ONNX Runtime with one and
with two intra-op threads (tests/conftest.py, ORT_THREADS_VARIABLE). ONNX Runtime's own kernels (MLAS) choose
their instruction set from the processor and have no such switch.
"""

from __future__ import annotations

import collections
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.cli import OneLineErrors
from benchmarks.gpu_checks.environment import cpu_name, load_average
from benchmarks.tables import markdown_table, text_table

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "tests"))
from conftest import ORT_THREADS_VARIABLE  # noqa: E402
from rounding import REPORT_VARIABLE  # noqa: E402

SETTINGS = {
    "as is": {},
    "aten avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten default": {"ATEN_CPU_CAPABILITY": "default"},
    "mkl avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "ort 1 thread": {ORT_THREADS_VARIABLE: "1"},
    "ort 2 threads": {ORT_THREADS_VARIABLE: "2"},
}


def run_suite(setting: str, tests: list[str]) -> dict:
    """pytest under one setting: its closing counts, seconds, and every comparison's record."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "comparisons.jsonl"
        environment = {**os.environ, **SETTINGS[setting], REPORT_VARIABLE: str(report)}
        start = time.perf_counter()
        finished = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                                  cwd=REPOSITORY, env=environment, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        records = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    lines = finished.stdout.strip().splitlines()
    return {"setting": setting, "summary": lines[-1] if lines else finished.stderr.strip()[-200:],
            "exit": finished.returncode, "seconds": seconds, "records": records}


def largest_gaps(records: list[dict]) -> dict:
    """(test, label) -> the largest gap of the comparisons with that name."""
    gaps: dict = {}
    for record in records:
        key = (record["test"], record["label"])
        gaps[key] = max(gaps.get(key, 0.0), record["gap"])
    return gaps


def tables(runs: list[dict]) -> tuple[list[str], list[list], list[str], list[list]]:
    first = largest_gaps(runs[0]["records"])
    rows, moved_modules = [], collections.defaultdict(set)
    for run in runs:
        gaps = largest_gaps(run["records"])
        moved = {key: abs(gaps[key] - first[key]) for key in gaps.keys() & first.keys() if gaps[key] != first[key]}
        for test, _ in moved:
            moved_modules[test.split("::")[0]].add(run["setting"])
        ratios = [record["ratio"] for record in run["records"]]
        closest = max((ratio for ratio in ratios if ratio <= 1), default=0.0)
        rows.append([run["setting"], run["summary"], f"{run['seconds']:.0f}", len(ratios), len(moved),
                     f"{max(moved.values(), default=0.0):.3g}", f"{closest:.3g}",
                     sum(ratio > 1 for ratio in ratios)])
    header = ["setting", "pytest", "s", "comparisons", "moved", "largest move", "largest gap/bound within",
              "outside (planted)"]
    modules = sorted({record["test"].split("::")[0] for run in runs for record in run["records"]})
    module_rows = [[module, ", ".join(sorted(moved_modules[module])) or "none"] for module in modules]
    return header, rows, ["test module", "settings that moved its numbers"], module_rows


def main(argv=None) -> int:
    parser = OneLineErrors(prog="python -m benchmarks.kernel_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", nargs="*", default=["tests"], help="what pytest runs (default: the suite)")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="comma-separated, the first is the one the others are compared with: "
                             + ", ".join(SETTINGS))
    parser.add_argument("--out", help="also write the tables, the machine and the command to this markdown file")
    options = parser.parse_args(argv)
    settings = [name.strip() for name in options.settings.split(",")]
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting {unknown[0]!r}")
    machine = f"{cpu_name()}, {os.cpu_count()} cores, load average {load_average()} at the start"
    runs = []
    for setting in settings:
        print(f"Running the tests with {setting} ...", file=sys.stderr, flush=True)
        runs.append(run_suite(setting, options.tests))
    header, rows, module_header, module_rows = tables(runs)
    print(machine)
    print(text_table(header, rows))
    print()
    print(text_table(module_header, module_rows))
    if options.out:
        command = shlex.join(["python", "-m", "benchmarks.kernel_sweep", *(argv if argv is not None else sys.argv[1:])])
        Path(options.out).write_text(
            f"# The suite under kernel and thread settings\n\n`{command}`\n\n{machine}; load average "
            f"{load_average()} at the end.\n\n{markdown_table(header, rows)}\n\n"
            f"{markdown_table(module_header, module_rows)}\n", encoding="utf-8")
    return 0 if all(run["exit"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
