"""What a run does: the checks, models and lengths the options ask for, sized to the machine."""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.gpu_checks.timing import MIN_RUNS
from benchmarks.models import MODEL_NAMES

CHECKS = ("verify", "benchmark", "generation", "cost")
DEFAULT_CHECKS = ("verify", "benchmark", "generation")  # cost is opt-in: CPU figures, about a minute more there
VERIFIED_MODELS = ("tiny", "small", "large")  # large on CUDA only (its exports take minutes on the CPU)
GENERATION_MODELS = ("tiny", "small")  # large: the decoder export alone would take minutes

# Benchmark lengths. GPU: those of the first timings of transformers' Reformer. CPU: what finishes in about
# 2 minutes on 2 cores.
GPU_LENGTHS = {"tiny": (256,), "small": (4096, 65536), "large": (16384, 65536)}
CPU_LENGTHS = {"tiny": (256,), "small": (1024, 4096)}
# Used when a model is verified but not benchmarked, or --lengths leaves it without a length.
DEFAULT_MAX_LENGTH = {"small": 4096, "large": 16384}
# The benchmark rows of ONNX Runtime on the graphs with fused attention (Plan.onnx_runtimes), each with the
# `custom_ops` of its graph: ONNX Runtime's MultiHeadAttention, and ONNX's Attention op (opset 23).
FUSED_ONNX_RUNTIMES = {"onnxruntime-fused": "ort", "onnxruntime-attention": "onnx-attention"}


@dataclass
class Plan:
    device: str  # "cuda" or "cpu": where benchmarks and generation run
    models: list[str]
    checks: list[str]
    lengths: dict[str, tuple[int, ...]]  # benchmark lengths per model
    modes: tuple[str, ...]  # precision modes: fp32 (strict), tf32, fp16
    warmup: int
    max_runs: int
    generation_repeats: int
    threads: int | None  # intra-op threads of torch and the benchmark's ONNX Runtime sessions (None: theirs)
    aoti: bool = False  # AOTInductor packages (.pt2) verified and timed too: with CUDA, or asked for with --aoti
    budget_minutes: float | None = None  # steps and benchmark lengths not started by then are skipped (steps.py)
    notes: list[str] = field(default_factory=list)

    def max_length(self, name: str) -> int:
        """The model's max_position_embeddings: its longest benchmark length, so one export serves them all."""
        return max(self.lengths.get(name) or (DEFAULT_MAX_LENGTH.get(name, 256),))

    def onnx_runtimes(self) -> dict[str, str]:
        """The benchmark's ONNX Runtime rows and the `custom_ops` of the graph each runs (exporters.onnx): each
        op's default lowering; with CUDA also every chunk attention as ONNX Runtime's MultiHeadAttention and as
        ONNX's Attention (FUSED_ONNX_RUNTIMES; exporters/ops/attention.py: neither paid on ONNX Runtime CPU; on
        CUDA a float mask runs on the fused memory-efficient kernel, which may, and `auto` for CUDA waits for
        these rows)."""
        runtimes = {"onnxruntime": "auto"}
        if self.device == "cuda":
            runtimes.update(FUSED_ONNX_RUNTIMES)
        return runtimes


def make_plan(arguments, cuda: bool) -> Plan:
    full = cuda and not arguments.quick
    models = arguments.models or (list(MODEL_NAMES) if cuda else ["tiny", "small"])
    notes = []
    if "large" in models and not cuda:
        models = [name for name in models if name != "large"]
        notes.append("large: skipped, it is benchmarked on a GPU only (torch sees no CUDA device)")
    table = GPU_LENGTHS if full else CPU_LENGTHS
    lengths = {}
    for name in models:
        wanted = tuple(arguments.lengths) if arguments.lengths else table.get(name, ())
        lengths[name] = tuple(length for length in wanted if name != "tiny" or length <= 256)
        if len(lengths[name]) < len(wanted):
            notes.append("tiny: lengths above its maximum of 256 skipped")
    if arguments.quick:
        warmup, max_runs, repeats = 1, MIN_RUNS, 1
    else:
        warmup, max_runs, repeats = (3, 20, 3) if cuda else (2, 20, 2)
    modes = ("fp32", "tf32", "fp16") if cuda else ("fp32",)
    return Plan("cuda" if cuda else "cpu", models, arguments.checks, lengths, modes, warmup, max_runs, repeats,
                arguments.threads, cuda or arguments.aoti, arguments.budget_minutes, notes)
