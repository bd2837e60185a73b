"""The command line: `python -m benchmarks.gpu_checks --out DIR ...` (the package's docstring says what it does)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import tempfile
from pathlib import Path

import benchmarks.gpu_checks
from benchmarks.cli import OneLineErrors
from benchmarks.gpu_checks.benchmark import benchmark_exports, benchmark_model
from benchmarks.gpu_checks.cost import measure_costs
from benchmarks.gpu_checks.environment import environment
from benchmarks.gpu_checks.exports import Exports
from benchmarks.gpu_checks.generation import generation_model
from benchmarks.gpu_checks.plan import (
    CHECKS,
    DEFAULT_CHECKS,
    GENERATION_MODELS,
    VERIFIED_MODELS,
    make_plan,
)
from benchmarks.gpu_checks.report import Results, summary_header, summary_rows
from benchmarks.gpu_checks.steps import run_step, seconds_since_start, skipped_for_time
from benchmarks.gpu_checks.verification import verification_exports, verify_model
from benchmarks.models import MODEL_NAMES, build_model
from benchmarks.tables import text_table


def comma_list(kind, choices=None):
    def parse(text: str) -> list:
        values = [kind(part) for part in text.split(",") if part]
        unknown = [value for value in values if choices and value not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}" if choices else "give a list")
        return values
    return parse


def parse_arguments(argv=None):
    parser = OneLineErrors(prog="python -m benchmarks.gpu_checks",
                           description=benchmarks.gpu_checks.__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help="CPU-sized lengths and the fewest timed runs")
    parser.add_argument("--models", type=comma_list(str, MODEL_NAMES),
                        help="comma-separated, from tiny,small,large (default: all with CUDA, tiny,small without)")
    parser.add_argument("--lengths", type=comma_list(int),
                        help="benchmark lengths for every model (default: tiny 256; with CUDA small 4096,65536 and "
                        "large 16384,65536; without CUDA or with --quick small 1024,4096)")
    parser.add_argument("--checks", type=comma_list(str, CHECKS), default=list(DEFAULT_CHECKS),
                        help=f"comma-separated, from {','.join(CHECKS)} (default: {','.join(DEFAULT_CHECKS)}; "
                        "cost runs on the CPU only)")
    parser.add_argument("--threads", type=int, help="intra-op threads of torch and ONNX Runtime (default: "
                        "theirs, one per core); 1 on a shared CPU, where waiting for a preempted thread dominates")
    parser.add_argument("--aoti", action="store_true", help="also verify and time AOTInductor packages (.pt2) "
                        "without CUDA (with CUDA they always are; each takes a C++ compile, minutes on a small CPU)")
    parser.add_argument("--budget-minutes", type=float, help="from the start of the run: steps and benchmark "
                        "lengths not started by then are skipped with a note (default: no limit)")
    arguments = parser.parse_args(argv)
    if arguments.lengths and min(arguments.lengths) < 1:
        parser.error("--lengths must be positive")
    if arguments.threads is not None and arguments.threads < 1:
        parser.error("--threads must be positive")
    if arguments.budget_minutes is not None and not arguments.budget_minutes >= 0:  # `not >=` refuses nan too
        parser.error("--budget-minutes must be 0 or more")
    try:
        arguments.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"cannot create --out {arguments.out}: {error.strerror}")
    if not os.access(arguments.out, os.W_OK):
        parser.error(f"cannot write to --out {arguments.out}")
    return arguments


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    import torch  # before onnxruntime, so its CUDA provider finds the CUDA libraries torch loaded

    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    env = environment()
    plan = make_plan(arguments, env["cuda_available"])
    command = "python -m benchmarks.gpu_checks " + " ".join(sys.argv[1:] if argv is None else argv)
    results = Results(arguments.out, command, env, dataclasses.asdict(plan))
    results.notes += plan.notes
    print(f"started {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: {command}")
    for key, value in env.items():
        print(f"{key}: {value}")
    results.save()
    models = {}

    def model_and_spec(name: str):
        if name not in models:
            models[name] = build_model(name, plan.max_length(name))
        return models[name]

    with tempfile.TemporaryDirectory(prefix="gpu-checks-") as folder:
        exports = Exports(Path(folder), results)
        # Every graph the checks need, exported at once: in parallel where the machine has the cores.
        jobs = (verification_exports(plan) if "verify" in plan.checks else []) + (
            benchmark_exports(plan) if "benchmark" in plan.checks else [])
        if jobs and not skipped_for_time(results, "exports", plan):
            exports.prepare(jobs)
        # The acceptance checks first (verification, generation), the slowest benchmarks last: a run cut short
        # by a time limit loses the least. Out of time, a model is not even built.
        for name in plan.models:
            if ("verify" in plan.checks and name in VERIFIED_MODELS
                    and not skipped_for_time(results, f"verify {name}", plan)):
                verify_model(name, *model_and_spec(name), plan, exports, results)
        for name in plan.models:
            if "generation" in plan.checks and name in GENERATION_MODELS:
                run_step(results, f"generation {name}", lambda name=name: generation_model(
                    name, model_and_spec(name)[0], plan, Path(folder), results), plan)
        for name in plan.models:
            if "benchmark" in plan.checks and not skipped_for_time(results, f"benchmark {name}", plan):
                benchmark_model(name, *model_and_spec(name), plan, exports, results)
            models.pop(name, None)  # benchmarks come last: the model is no longer needed
    if "cost" in plan.checks:  # graph_cost builds and exports its own models
        measure_costs(plan, results)
    results.complete = True
    results.seconds = round(seconds_since_start())
    results.save()
    print()
    print(text_table(summary_header(results), summary_rows(results)))
    for line in results.notes + [f"ERROR {error}" for error in results.errors]:
        print(line)
    print(f"wrote {arguments.out / 'results.json'} and {arguments.out / 'results.md'}")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
