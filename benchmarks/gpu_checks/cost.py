"""The cost step, on the CPU only: benchmarks/graph_cost.py's figures for each benchmarked model and length
(nodes, bytes written per forward on ONNX Runtime CPU, peak resident memory of ONNX Runtime and of our eager
PyTorch). Bytes written is the memory traffic a GPU pays for too, the CPU-side figure to watch when the
model's hot paths change. Not with CUDA: the GPU plan's lengths (up to 65,536 tokens) would take minutes on
ONNX Runtime CPU, and the CPU machine's run gives these figures."""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.gpu_checks.plan import Plan
from benchmarks.gpu_checks.steps import log, run_step

if TYPE_CHECKING:
    from benchmarks.gpu_checks.report import Results


def measure_costs(plan: Plan, results: Results) -> None:
    import torch

    from benchmarks.graph_cost import measure

    if plan.device == "cuda":
        results.notes.append("cost: skipped on CUDA, graph_cost measures ONNX Runtime CPU (run --checks cost on "
                             "the CPU machine)")
        return
    threads = plan.threads or torch.get_num_threads()  # graph_cost needs a number; None means torch's own
    for name in plan.models:
        for length in plan.lengths.get(name, ()):
            def measure_one(name=name, length=length):
                log(f"graph cost of {name} at {length} tokens, {threads} threads ...")
                # graph_cost exports its own graph (with the per-node module names) at max length = `length`.
                results.add_cost(name, length, threads, measure(name, length, "fp32", threads, "auto", None))

            run_step(results, f"cost {name} {length}", measure_one, plan)
