"""Every GPU check and benchmark in one run; without CUDA it runs the CPU part of them.

    python -m benchmarks.gpu_checks --out DIR [--quick] [--models tiny,small,large] [--lengths 4096,65536]
                                    [--checks verify,benchmark,generation] [--threads N]

(from the repository root; benchmarks/README.md says how to run it on the device machine.)

1. Environment: Python, torch and its CUDA device, onnxruntime and the providers it lists, CPU and load.
2. Verification (models tiny and small): export to ONNX and TorchScript (fp32, and fp16 with CUDA) and run
   `exporters.verify.verify_export` on ONNX Runtime CPU and CUDA and TorchScript CPU and CUDA at its default
   shapes (up to 4,096 tokens on the CPU runtimes). CUDA fp32 is strict (ORT `use_tf32=0`, torch TF32 off);
   one more ORT CUDA row runs with TF32 on, against eager with TF32 allowed, under the fp16 rule (TF32 keeps
   fp16's 10 mantissa bits).
3. Benchmarks (forward only, batch 1, random weights, random token ids, no padding): eager PyTorch, ONNX
   Runtime and TorchScript on the same device and precision (CUDA: fp32 strict, tf32, fp16; CPU: fp32).
   Each runtime's output is first compared with eager's at the timed shape. Timing: `warm-up` runs, then
   runs until `max runs` or about 5 s; every run is bracketed by a device synchronisation and a clock read
   (CUDA events would miss ONNX Runtime's own stream); medians are reported. ONNX Runtime on CUDA runs
   through IO binding with inputs and outputs on the device, as eager's stay. Peak memory on CUDA: for
   eager and TorchScript, the runtime's own weights plus how far `torch.cuda.max_memory_allocated` rose
   during the timed runs; for ONNX Runtime, the drop in the device's free memory since its session was made
   (its arena, which holds the most any length so far needed; `arena_extend_strategy` kSameAsRequested
   keeps it close to need).
4. Generation (issue 4): tokens/s of `reformer.runtime.OnnxGenerator` against eager `reformer.generation.
   generate` with the cache, batch 1 and 8, greedy, prompt then new tokens (prefill included), fp32 strict,
   on the same device, timed with benchmarks/generation_speed.py's helpers; both must produce the same
   tokens. Skipped, with a note, when those modules are absent.

Order: verification, generation, then benchmarks (the slowest last), so a run cut short loses the least.

Models (random weights from seed 0, causal LM, byte vocabulary of 258): `tiny` is models/tiny; `small` and
`large` are ../shared/DESIGN.md's anchor shapes, built with `max_position_embeddings` = the longest length
benchmarked (so `num_buckets` follows the library's rule for that length) and square axial positions.

DIR gets results.json and results.md, rewritten after every step, so a run cut short keeps what it measured;
exported files go to a temporary folder that is removed at the end. The exit status is 1 when a
verification row failed or a step raised (the traceback is printed to stderr, the run goes on).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

MODEL_NAMES = ("tiny", "small", "large")
VERIFIED_MODELS = ("tiny", "small")  # large: its benchmark rows compare every runtime with eager instead
GENERATION_MODELS = ("tiny", "small")  # large: the decoder export alone would take minutes
CHECKS = ("verify", "benchmark", "generation")
CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"

SHAPES = {
    "small": dict(hidden_size=256, attn_layers=["local", "lsh"] * 3, num_attention_heads=2, attention_head_size=128,
                  feed_forward_size=512, local_attn_chunk_length=64, lsh_attn_chunk_length=64, num_hashes=1,
                  axial_pos_embds_dim=[64, 192]),
    "large": dict(hidden_size=1024, attn_layers=["local", "lsh"] * 6, num_attention_heads=8, attention_head_size=128,
                  feed_forward_size=4096, local_attn_chunk_length=128, lsh_attn_chunk_length=256, num_hashes=2,
                  axial_pos_embds_dim=[256, 768]),
}
COMMON_VALUES = dict(is_decoder=True, hash_seed=0, vocab_size=258, hidden_dropout_prob=0.0,
                     local_attention_probs_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0)
# Benchmark lengths. GPU: DESIGN.md's anchors. CPU: what finishes in about 2 minutes on 2 cores.
GPU_LENGTHS = {"tiny": (256,), "small": (4096, 65536), "large": (16384, 65536)}
CPU_LENGTHS = {"tiny": (256,), "small": (1024, 4096)}
# Used when a model is verified but not benchmarked, or --lengths leaves it without a length.
DEFAULT_MAX_LENGTH = {"small": 4096, "large": 16384}
CPU_VERIFY_MAX_LENGTH = 4096
GENERATION_BATCHES = (1, 8)
GENERATION_PROMPT, GENERATION_NEW_TOKENS = 64, 128
SECONDS_PER_RUNTIME = 5.0  # timed runs stop after about this long (once MIN_RUNS are done)
MIN_RUNS = 3


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
    notes: list[str] = field(default_factory=list)


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
                arguments.threads, notes)


# ----- environment -----

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment() -> dict:
    import torch

    values = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_cuda_version": torch.version.cuda,
        "cpu": f"{cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        "load_average_start": [round(load, 2) for load in os.getloadavg()],
        "hostname": platform.node(),
    }
    try:
        import onnxruntime

        values["onnxruntime"] = onnxruntime.__version__
        values["onnxruntime_providers_available"] = list(onnxruntime.get_available_providers())
    except ImportError as error:
        values["onnxruntime"] = f"not importable: {error}"
        values["onnxruntime_providers_available"] = []
    return values


def card_name(device: str, env: dict) -> str:
    """Named on every figure: the GPU for CUDA rows, the processor for CPU rows."""
    return env["cuda_device"] if device == "cuda" else f"CPU {cpu_name()}"


# ----- models and exports -----

def axial_shape(length: int) -> list[int]:
    """Two factors whose product covers `length`, as square as powers of two allow (64 x 64 for 4,096)."""
    first = 2 ** math.ceil(math.log2(length) / 2)
    return [first, math.ceil(length / first)]


def build_model(name: str, max_length: int):
    """(model in eval mode on the CPU, fp32; its causal-lm spec)."""
    import torch

    from exporters.models import RANDOM_WEIGHTS_SEED, resolve_model
    from exporters.specs import TASKS
    from reformer import ReformerConfig, ReformerModelWithLMHead

    if name == "tiny":
        resolved = resolve_model("tiny", "causal-lm")
        return resolved.model, resolved.spec
    config = ReformerConfig(**SHAPES[name], **COMMON_VALUES, max_position_embeddings=max_length,
                            axial_pos_shape=axial_shape(max_length))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model = ReformerModelWithLMHead(config).eval()
    return model, TASKS["causal-lm"]


def export_device(fmt: str, dtype: str, device: str) -> str:
    """Where a graph is exported: fp32 ONNX on the CPU (the file serves both execution providers), fp16 on
    CUDA (its runtime); TorchScript on the device that runs it (a trace records its device)."""
    if fmt == "onnx":
        return "cuda" if dtype == "fp16" else "cpu"
    return device


class Exports:
    """Each (model, format, dtype, export device) exported once, into a temporary folder."""

    def __init__(self, folder: Path, results: "Results"):
        self.folder = folder
        self.results = results
        self.paths: dict[tuple, Path] = {}

    def get(self, name: str, model, spec, fmt: str, dtype: str, runtime_device: str) -> Path:
        """The file for a runtime on `runtime_device`, exported on first use."""
        from exporters.onnx import export_onnx
        from exporters.torchscript import export_torchscript

        device = export_device(fmt, dtype, runtime_device)
        key = (name, fmt, dtype, device)
        if key not in self.paths:
            path = self.folder / f"{name}-{dtype}-{device}.{'onnx' if fmt == 'onnx' else 'pt'}"
            log(f"exporting {name} to {fmt}, {dtype}, on {device} ...")
            start = time.perf_counter()
            exporter = export_onnx if fmt == "onnx" else export_torchscript
            exporter(model, spec, path, dtype=dtype, device=device)
            seconds = time.perf_counter() - start
            self.results.exports.append({"model": name, "format": fmt, "dtype": dtype, "device": device,
                                         "seconds": round(seconds, 1), "megabytes": round(folder_bytes(path) / 1e6, 1)})
            self.paths[key] = path
        return self.paths[key]


def folder_bytes(path: Path) -> int:
    """The file and its external-data file, if any."""
    return sum(candidate.stat().st_size for candidate in (path, path.with_name(path.name + ".data"))
               if candidate.exists())


# ----- runtimes -----

class RuntimeUnavailable(Exception):
    """A runtime that cannot run here (no CUDA provider, a session that fell back to the CPU)."""


def ort_providers(device: str, tf32: bool) -> list:
    if device == "cpu":
        return [CPU_PROVIDER]
    # kSameAsRequested keeps the arena close to what the runs need, so its size means something.
    options = {"use_tf32": "1" if tf32 else "0", "arena_extend_strategy": "kSameAsRequested"}
    return [(CUDA_PROVIDER, options), CPU_PROVIDER]


class OrtRunner:
    """An ONNX Runtime session on `device`; refuses to exist when CUDA was asked for and is not first in the
    session's providers (ONNX Runtime falls back to the CPU silently)."""

    def __init__(self, path: Path, device: str, tf32: bool = False, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.device = device
        self.session = onnxruntime.InferenceSession(str(path), options, providers=ort_providers(device, tf32))
        self.providers = self.session.get_providers()
        log(f"onnxruntime session {path.name} ({'tf32' if tf32 else 'strict fp32'} on {device}): {self.providers}")
        if device == "cuda" and self.providers[0] != CUDA_PROVIDER:
            raise RuntimeUnavailable(f"onnxruntime session fell back to {self.providers}")
        self.input_names = [graph_input.name for graph_input in self.session.get_inputs()]
        self.output_names = [output.name for output in self.session.get_outputs()]

    def feeds(self, input_ids, attention_mask) -> dict:
        return dict(zip(self.input_names, (input_ids.cpu().numpy(), attention_mask.cpu().numpy())))

    def outputs(self, input_ids, attention_mask) -> list:
        import torch

        return [torch.from_numpy(output) for output in self.session.run(None, self.feeds(input_ids, attention_mask))]

    def timed_call(self, input_ids, attention_mask):
        """A call that runs the graph once. On CUDA, inputs and outputs stay on the device (IO binding), as
        eager's do."""
        feeds = self.feeds(input_ids, attention_mask)
        if self.device == "cpu":
            return lambda: self.session.run(None, feeds)
        import onnxruntime

        binding = self.session.io_binding()
        device_inputs = {name: onnxruntime.OrtValue.ortvalue_from_numpy(array, "cuda", 0) for name, array in feeds.items()}
        for name, value in device_inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda")

        def run():
            self.session.run_with_iobinding(binding)
            return device_inputs  # the closure keeps the device inputs alive as long as the binding is used

        return run


class TorchRunner:
    """Eager PyTorch (the export wrapper) or a loaded TorchScript module, with OrtRunner's interface."""

    def __init__(self, module, device: str):
        self.module = module
        self.device = device
        self.providers = []
        self.weight_bytes = sum(tensor.numel() * tensor.element_size()
                                for tensor in (*module.parameters(), *module.buffers()))

    def outputs(self, input_ids, attention_mask) -> list:
        outputs = self.module(input_ids.to(self.device), attention_mask.to(self.device))
        return [outputs] if not isinstance(outputs, (tuple, list)) else list(outputs)

    def timed_call(self, input_ids, attention_mask):
        return lambda: self.module(input_ids, attention_mask)


def tf32_matmuls(enabled: bool):
    """exporters.verify.tf32_matmuls, imported when first used (this script loads torch lazily)."""
    from exporters.verify import tf32_matmuls as switch

    return switch(enabled)


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def time_runs(call, device: str, warmup: int, max_runs: int, min_runs: int = MIN_RUNS) -> list[float]:
    """Milliseconds of each timed run, after `warmup` untimed ones: at least min_runs, then more until
    max_runs or about SECONDS_PER_RUNTIME."""
    for _ in range(warmup):
        call()
    synchronize(device)
    times = []
    while len(times) < max_runs and (len(times) < min_runs or sum(times) < SECONDS_PER_RUNTIME * 1e3):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def free_device_bytes() -> int:
    """Free CUDA memory once torch has handed back its cached blocks."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


# ----- verification -----

def verification_cases(cuda: bool) -> list[tuple[str, str, str]]:
    """(format, dtype, runtime) to verify. fp32 ONNX is one file for both execution providers; TorchScript
    runs where it was traced; fp16 is for CUDA only."""
    cases = [("onnx", "fp32", "onnxruntime-cpu"), ("torchscript", "fp32", "torchscript-cpu")]
    if cuda:
        cases += [("onnx", "fp32", "onnxruntime-cuda"), ("torchscript", "fp32", "torchscript-cuda"),
                  ("onnx", "fp16", "onnxruntime-cuda"), ("torchscript", "fp16", "torchscript-cuda")]
    return cases


def verification_shapes(config, device: str):
    """The verifier's default shapes, up to CPU_VERIFY_MAX_LENGTH on the CPU (the CPU machine's own run
    covers that; 2 x 65,536 would take minutes there)."""
    from exporters.verify import default_shapes

    max_length = config.max_position_embeddings
    return default_shapes(config, min(max_length, CPU_VERIFY_MAX_LENGTH) if device == "cpu" else max_length)


def verify_model(name: str, model, spec, plan: Plan, exports: Exports, results: "Results") -> None:
    from exporters.verify import verify_export

    for fmt, dtype, runtime in verification_cases(plan.device == "cuda"):
        runtime_device = runtime.split("-")[1]
        device = export_device(fmt, dtype, runtime_device)

        def verify(fmt=fmt, dtype=dtype, runtime=runtime, runtime_device=runtime_device, device=device):
            path = exports.get(name, model, spec, fmt, dtype, runtime_device)
            log(f"verifying {name} {fmt} {dtype} on {runtime} ...")
            report = verify_export(model, spec, path, fmt, dtype=dtype, device=device, runtimes=[runtime],
                                   shapes=verification_shapes(model.config, runtime_device))
            results.add_verification(name, dtype, report)

        run_step(results, f"verify {name} {fmt} {dtype} {runtime}", verify)
    if plan.device == "cuda":
        run_step(results, f"verify {name} onnx tf32 onnxruntime-cuda", lambda: results.add_verification(
            name, "tf32", verify_onnx_tf32(model, spec, exports.get(name, model, spec, "onnx", "fp32", "cpu"),
                                           verification_shapes(model.config, "cuda"))))
    else:
        results.notes.append(f"{name}: CUDA runtimes, TF32 and fp16 not verified (torch sees no CUDA device)")


def verify_onnx_tf32(model, spec, path: Path, shapes):
    """ORT CUDA with TF32 against eager CUDA with TF32 allowed, at `shapes`; a VerificationReport."""
    import torch

    from exporters.precision import model_as
    from exporters.verify import VerificationReport, verification_inputs

    log(f"verifying {path.name} on onnxruntime-cuda with TF32 ...")
    runner = OrtRunner(path, "cuda", tf32=True)
    eager = spec.wrap(model_as(model, "fp32", "cuda"), with_buckets=True)
    report = VerificationReport("onnx", str(path))
    for batch, length in shapes:
        input_ids, attention_mask = verification_inputs(batch, length, model.config.vocab_size)
        with torch.no_grad(), tf32_matmuls(True):
            expected = [tensor.cpu() for tensor in eager(input_ids.cuda(), attention_mask.cuda())]
        report.rows.append(compare_with(runner, expected, spec, input_ids, attention_mask,
                                        "onnxruntime-cuda", "tf32"))
    return report


def compare_with(runner, expected, spec, input_ids, attention_mask, runtime: str, precision: str):
    """`exporters.verify.compare` of `runner`'s outputs against outputs eager already produced. TF32 gets the
    fp16 rule (1e-2 of the output scale): both keep 10 explicit mantissa bits."""
    from exporters.verify import compare

    rule = "fp16" if precision == "tf32" else precision
    row = compare(runner.outputs, lambda *_: expected, spec, input_ids, attention_mask, runtime,
                  runtime.split("-")[1], rule, None)
    row.dtype = precision
    return row


# ----- benchmarks -----

def benchmark_inputs(length: int, vocab_size: int, seed: int = 0):
    """Batch 1, random ids in 1 .. vocab - 1 (id 0 is padding), nothing masked."""
    import torch

    generator = torch.Generator().manual_seed(seed + length)
    input_ids = torch.randint(1, vocab_size, (1, length), generator=generator)
    return input_ids, torch.ones_like(input_ids)


def benchmark_model(name: str, model, spec, plan: Plan, exports: Exports, results: "Results") -> None:
    if not plan.lengths.get(name):
        results.notes.append(f"{name}: no benchmark lengths in this plan")
        return
    for mode in plan.modes:
        run_step(results, f"benchmark {name} {mode}", lambda mode=mode: benchmark_mode(
            name, model, spec, mode, plan, exports, results))


def benchmark_mode(name, model, spec, mode: str, plan: Plan, exports: Exports, results: "Results") -> None:
    """Eager, ONNX Runtime and TorchScript at every length of the plan, in one precision mode."""
    import gc

    import torch

    from exporters.precision import model_as

    device, dtype = plan.device, "fp16" if mode == "fp16" else "fp32"
    runners = {"eager": TorchRunner(spec.wrap(model_as(model, dtype, device), with_buckets=True), device)}

    def open_torchscript():
        path = exports.get(name, model, spec, "torchscript", dtype, device)
        return TorchRunner(torch.jit.load(str(path), map_location=device), device)

    def open_onnxruntime():
        path = exports.get(name, model, spec, "onnx", dtype, device)
        return OrtRunner(path, device, tf32=mode == "tf32", threads=plan.threads)

    torch_free = None
    for runtime, open_runner in (("torchscript", open_torchscript), ("onnxruntime", open_onnxruntime)):
        if runtime == "onnxruntime" and device == "cuda":
            warm_up_torch(runners, model.config.vocab_size, mode)
            torch_free = free_device_bytes()  # what ORT takes from here on is its own
        try:
            runners[runtime] = open_runner()
        except Exception as error:  # one runtime that cannot run must not cost the others
            results.fail(f"benchmark {name} {mode} {runtime}", error)
    for length in plan.lengths[name]:
        input_ids, attention_mask = (tensor.to(device) for tensor in benchmark_inputs(length, model.config.vocab_size))
        with torch.no_grad(), tf32_matmuls(mode == "tf32"):
            expected = [tensor.cpu() for tensor in runners["eager"].outputs(input_ids, attention_mask)]
            for runtime, runner in runners.items():
                row = benchmark_row(runtime, runner, expected, spec, input_ids, attention_mask, plan,
                                    mode)
                if runtime == "onnxruntime" and torch_free is not None:
                    row["ort_device_gib"] = (torch_free - free_device_bytes()) / 2**30
                results.add_benchmark(name, length, mode, device, row)
                results.save()
    runners.clear()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def warm_up_torch(runners: dict, vocab_size: int, mode: str) -> None:
    """One short forward of each torch runner, so that the libraries they initialise lazily (cuBLAS
    workspaces, fused kernels) are not counted as ONNX Runtime's memory."""
    import torch

    input_ids, attention_mask = (tensor.cuda() for tensor in benchmark_inputs(8, vocab_size))
    with torch.no_grad(), tf32_matmuls(mode == "tf32"):
        for runner in runners.values():
            runner.outputs(input_ids, attention_mask)


def benchmark_row(runtime, runner, expected, spec, input_ids, attention_mask, plan: Plan, mode) -> dict:
    import torch

    device = plan.device
    row = {"runtime": runtime, "providers": runner.providers}
    if runtime != "eager":  # every other runtime is checked against eager at the timed shape
        check = compare_with(runner, expected, spec, input_ids, attention_mask, f"{runtime}-{device}", mode)
        row.update(max_abs=check.max_abs, tolerance=check.tolerance, bucket_agreement=check.bucket_agreement,
                   passed=check.passed, note=check.note)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
    log(f"timing {runtime} {mode} at {input_ids.shape[1]} tokens ...")
    times = time_runs(runner.timed_call(input_ids, attention_mask), device, plan.warmup, plan.max_runs)
    row.update(median_ms=statistics.median(times), min_ms=min(times), runs=len(times))
    if device == "cuda" and runtime != "onnxruntime":
        # Its own weights plus the most its runs held on top of everything resident before them.
        peak = torch.cuda.max_memory_allocated() - allocated_before + runner.weight_bytes
        row["peak_gib"] = peak / 2**30
    return row


# ----- generation -----

def generation_model(name: str, model, plan: Plan, folder: Path, results: "Results") -> None:
    """Export the decoder graphs, then time greedy generation with benchmarks/generation_speed.py's helpers:
    median of `generation_repeats` runs after one warm-up, tokens/s = batch x new tokens / seconds."""
    import numpy as np
    import torch

    from exporters.precision import model_as

    try:
        from benchmarks.generation_speed import eager_runner, median_seconds
        from exporters.decoder import export_causal_lm_with_past
        from reformer.runtime import OnnxGenerator
    except ImportError as error:
        results.notes.append(f"generation skipped: {error} (needs exporters.decoder, reformer.runtime.OnnxGenerator "
                             f"and benchmarks/generation_speed.py)")
        return
    directory = folder / f"{name}-decoder"
    log(f"exporting {name} as causal-lm-with-past (prefill and decoder step, ONNX fp32; verified on the CPU) ...")
    start = time.perf_counter()
    description = export_causal_lm_with_past(model, str(directory), "onnx")
    results.exports.append({"model": name, "format": "onnx causal-lm-with-past", "dtype": "fp32", "device": "cpu",
                            "seconds": round(time.perf_counter() - start, 1),
                            "megabytes": round(sum(path.stat().st_size for path in directory.iterdir()) / 1e6, 1)})
    generator = OnnxGenerator(directory, providers=ort_providers(plan.device, tf32=False))
    providers = generator.providers_in_use
    log(f"onnxruntime generator {name}: {providers}")
    if plan.threads:
        results.notes.append(f"generation {name}: OnnxGenerator's sessions use ONNX Runtime's default intra-op "
                             f"threads (its constructor takes no session options); torch uses {plan.threads}")
    if plan.device == "cuda" and providers[0] != CUDA_PROVIDER:
        raise RuntimeUnavailable(f"onnxruntime generator fell back to {providers}")
    eager = model_as(model, "fp32", plan.device)  # a copy on CUDA: eager_runner moves the model it is given
    for batch in GENERATION_BATCHES:
        prompt = torch.randint(1, model.config.vocab_size, (batch, GENERATION_PROMPT),
                               generator=torch.Generator().manual_seed(batch))
        speeds = {}
        with tf32_matmuls(False):  # strict fp32, as the generator's CUDA sessions (use_tf32=0)
            for runtime, run in (("eager", eager_runner(eager, plan.device, prompt, GENERATION_NEW_TOKENS)),
                                 ("onnxruntime", lambda: generator.generate(prompt.numpy(), GENERATION_NEW_TOKENS))):
                log(f"generating {GENERATION_NEW_TOKENS} tokens, batch {batch}, {runtime} ...")
                seconds, speeds[f"{runtime}_tokens"] = median_seconds(run, plan.generation_repeats)
                speeds[runtime] = {"seconds": seconds, "tokens_per_second": batch * GENERATION_NEW_TOKENS / seconds}
        same_tokens = bool(np.array_equal(speeds.pop("eager_tokens"), speeds.pop("onnxruntime_tokens")))
        results.add_generation(name, batch, plan.device, providers, {
            **speeds, "same_tokens": same_tokens, "decoder_verified_max_abs": description["verified"]["max_abs_diff"]})
        results.save()


# ----- results -----

STARTED = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, with the seconds since the start (to plan runs under a time limit)."""
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


def run_step(results: "Results", step: str, action) -> None:
    """Run one step; a failure is recorded (traceback on stderr) and the run goes on. Results are saved after."""
    try:
        action()
    except RuntimeUnavailable as error:
        results.notes.append(f"{step}: skipped, {error}")
    except Exception as error:  # one failing export or runtime must not cost the other measurements
        results.fail(step, error)
    results.save()


@dataclass
class Results:
    out: Path
    command: str
    environment: dict
    plan: dict
    verification: list[dict] = field(default_factory=list)
    benchmarks: list[dict] = field(default_factory=list)
    generation: list[dict] = field(default_factory=list)
    exports: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    complete: bool = False
    seconds: int | None = None  # the whole run's, once complete

    def fail(self, step: str, error: BaseException) -> None:
        traceback.print_exception(error, file=sys.stderr)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        self.errors.append(f"{step}: {type(error).__name__}: {lines[0] if lines else ''}")

    def card(self, device: str) -> str:
        return card_name(device, self.environment)

    def add_verification(self, model: str, precision: str, report) -> None:
        for row in report.rows:
            self.verification.append({"model": model, "precision": precision, "card": self.card(row.device),
                                      **dataclasses.asdict(row)})
        self.notes += [f"verify {model} {precision}: skipped {reason}" for reason in report.skipped]

    def add_benchmark(self, model: str, length: int, mode: str, device: str, row: dict) -> None:
        self.benchmarks.append({"model": model, "length": length, "batch": 1, "precision": mode, "device": device,
                                "card": self.card(device), **row})

    def add_generation(self, model: str, batch: int, device: str, providers: list, speeds: dict) -> None:
        self.generation.append({"model": model, "batch": batch, "prompt": GENERATION_PROMPT,
                                "new_tokens": GENERATION_NEW_TOKENS, "precision": "fp32", "device": device,
                                "card": self.card(device), "onnxruntime_providers": providers, **speeds})

    @property
    def failed(self) -> bool:
        return bool(self.errors) or any(not row["passed"] for row in self.verification)

    def to_dict(self) -> dict:
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "out"}

    def save(self) -> None:
        self.environment["load_average_now"] = [round(load, 2) for load in os.getloadavg()]
        write_atomically(self.out / "results.json", json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        write_atomically(self.out / "results.md", markdown_report(self))


def write_atomically(path: Path, text: str) -> None:
    from reformer.checkpoint import atomic_write

    atomic_write(str(path), lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def verification_cell(rows: list[dict]) -> str:
    """The worst of a runtime's rows: verdict, max abs, lowest bucket agreement."""
    if not rows:
        return "-"
    worst = max(rows, key=lambda row: row["max_abs"] if row["max_abs"] == row["max_abs"] else math.inf)
    agreements = [row["bucket_agreement"] for row in rows if row["bucket_agreement"] is not None]
    buckets = f" b{100 * min(agreements):.1f}%" if agreements else ""
    verdict = "pass" if all(row["passed"] for row in rows) else "FAIL"
    return f"{verdict} {worst['max_abs']:.1e}{buckets}"


def shape_span(rows: list[dict]) -> str:
    shapes = sorted({tuple(row["shape"]) for row in rows}, key=lambda shape: (shape[1], shape[0]))
    return f"{shapes[0][0]}x{shapes[0][1]}..{shapes[-1][0]}x{shapes[-1][1]}"


def timing_cell(row: dict | None) -> str:
    if row is None:
        return "-"
    flag = "" if row.get("passed", True) else " (!)"  # output differs from eager beyond tolerance
    return f"{row['median_ms']:.4g} ms{flag}"


def summary_rows(results: Results) -> list[tuple]:
    """One row per verification group, benchmark shape and generation batch; the card on every row."""
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for row in results.verification:
        groups.setdefault((row["model"], row["device"], row["precision"]), []).append(row)
    for (model, device, precision), members in groups.items():
        by_runtime = {runtime: [row for row in members if row["runtime"] == runtime]
                      for runtime in ("onnxruntime", "torchscript")}
        rows.append(("verify", model, shape_span(members), f"{precision} {device}", "reference",
                     verification_cell(by_runtime["onnxruntime"]), verification_cell(by_runtime["torchscript"]),
                     results.card(device)))
    shapes: dict[tuple, dict[str, dict]] = {}
    for row in results.benchmarks:
        shapes.setdefault((row["model"], row["length"], row["precision"], row["device"]), {})[row["runtime"]] = row
    for (model, length, precision, device), by_runtime in shapes.items():
        rows.append(("benchmark", model, f"1x{length}", f"{precision} {device}",
                     *(timing_cell(by_runtime.get(runtime)) for runtime in ("eager", "onnxruntime", "torchscript")),
                     results.card(device)))
    for row in results.generation:
        same = "same tokens" if row["same_tokens"] else "TOKENS DIFFER"
        rows.append(("generate", row["model"], f"batch {row['batch']}", f"fp32 {row['device']}",
                     f"{row['eager']['tokens_per_second']:.0f} tok/s",
                     f"{row['onnxruntime']['tokens_per_second']:.0f} tok/s, {same}", "-", row["card"]))
    return rows


SUMMARY_HEADER = ("check", "model", "shape", "precision", "eager", "onnxruntime", "torchscript", "card")


def text_table(header, rows) -> str:
    lines = [tuple(header)] + [tuple(str(cell) for cell in row) for row in rows]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def number(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown_report(results: Results) -> str:
    env = results.environment
    parts = [
        f"# GPU checks: {env['cuda_device'] or 'no CUDA device (CPU part only)'}",
        "",
        f"Command: `{results.command}`  ",
        f"Complete: {'yes' if results.complete else 'no (cut short or still running)'}",
        "",
        "## Environment",
        *[f"- {key}: {value}" for key, value in env.items()],
        f"- plan: {json.dumps(results.plan)}",
        "",
        "## Summary",
        "Verification cells: worst row's verdict, max abs error and lowest bucket agreement. Benchmark cells: "
        "median ms; (!) marks an output that differs from eager beyond tolerance.",
        "",
        markdown_table(SUMMARY_HEADER, summary_rows(results)),
        "",
        "## Verification",
        markdown_table(("model", "runtime", "device", "shape", "precision", "max abs", "max rel", "tolerance",
                        "buckets", "result", "note", "card"), [
            (row["model"], row["runtime"], row["device"], f"{row['shape'][0]}x{row['shape'][1]}", row["precision"],
             f"{row['max_abs']:.2e}", f"{row['max_rel']:.2e}", f"{row['tolerance']:.2g}",
             "-" if row["bucket_agreement"] is None else f"{100 * row['bucket_agreement']:.2f}%",
             "pass" if row["passed"] else "FAIL", row["note"], row["card"]) for row in results.verification]),
        "",
        "## Benchmarks (batch 1, forward only)",
        markdown_table(("model", "length", "precision", "runtime", "median ms", "min ms", "runs", "peak GiB (torch)",
                        "ORT device GiB", "max abs vs eager", "buckets", "providers", "card"), [
            (row["model"], row["length"], row["precision"], row["runtime"], f"{row['median_ms']:.4g}",
             f"{row['min_ms']:.4g}", row["runs"], number(row.get("peak_gib")), number(row.get("ort_device_gib")),
             "-" if "max_abs" not in row else f"{row['max_abs']:.2e} ({'pass' if row['passed'] else 'FAIL'})",
             "-" if row.get("bucket_agreement") is None else f"{100 * row['bucket_agreement']:.2f}%",
             ", ".join(row.get("providers", [])) or "-", row["card"]) for row in results.benchmarks]),
        "",
        "## Generation (greedy, prefill included)",
        markdown_table(("model", "batch", "prompt + new", "eager tok/s", "onnxruntime tok/s", "same tokens",
                        "decoder graphs vs eager (CPU export check)", "providers", "card"), [
            (row["model"], row["batch"], f"{row['prompt']} + {row['new_tokens']}",
             f"{row['eager']['tokens_per_second']:.0f}", f"{row['onnxruntime']['tokens_per_second']:.0f}",
             "yes" if row["same_tokens"] else "NO", f"max abs {number(row.get('decoder_verified_max_abs'))}",
             ", ".join(row["onnxruntime_providers"]), row["card"]) for row in results.generation]),
        "",
        "## Exports",
        markdown_table(("model", "format", "dtype", "device", "seconds", "MB"),
                       [tuple(export.values()) for export in results.exports]),
        "",
        "## Notes",
        *[f"- {note}" for note in results.notes],
        *[f"- ERROR {error}" for error in results.errors],
        "",
    ]
    return "\n".join(parts)


# ----- command line -----

def comma_list(kind, choices=None):
    def parse(text: str) -> list:
        values = [kind(part) for part in text.split(",") if part]
        unknown = [value for value in values if choices and value not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}" if choices else "give a list")
        return values
    return parse


class OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_arguments(argv=None):
    parser = OneLineErrors(prog="python -m benchmarks.gpu_checks", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help="CPU-sized lengths and the fewest timed runs")
    parser.add_argument("--models", type=comma_list(str, MODEL_NAMES),
                        help="comma-separated, from tiny,small,large (default: all with CUDA, tiny,small without)")
    parser.add_argument("--lengths", type=comma_list(int),
                        help="benchmark lengths for every model (default: tiny 256; with CUDA small 4096,65536 and "
                        "large 16384,65536; without CUDA or with --quick small 1024,4096)")
    parser.add_argument("--checks", type=comma_list(str, CHECKS), default=list(CHECKS),
                        help="comma-separated, from verify,benchmark,generation (default: all)")
    parser.add_argument("--threads", type=int, help="intra-op threads of torch and ONNX Runtime (default: "
                        "theirs, one per core); 1 on a shared CPU, where waiting for a preempted thread dominates")
    arguments = parser.parse_args(argv)
    if arguments.lengths and min(arguments.lengths) < 1:
        parser.error("--lengths must be positive")
    if arguments.threads is not None and arguments.threads < 1:
        parser.error("--threads must be positive")
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
            lengths = plan.lengths.get(name) or (DEFAULT_MAX_LENGTH.get(name, 256),)
            models[name] = build_model(name, max(lengths))
        return models[name]

    with tempfile.TemporaryDirectory(prefix="gpu-checks-") as folder:
        exports = Exports(Path(folder), results)
        # The acceptance checks first (verification, generation), the slowest benchmarks last: a run cut short
        # by a time limit loses the least.
        for name in plan.models:
            if "verify" in plan.checks and name in VERIFIED_MODELS:
                verify_model(name, *model_and_spec(name), plan, exports, results)
        for name in plan.models:
            if "generation" in plan.checks and name in GENERATION_MODELS:
                run_step(results, f"generation {name}", lambda name=name: generation_model(
                    name, model_and_spec(name)[0], plan, Path(folder), results))
        for name in plan.models:
            if "benchmark" in plan.checks:
                benchmark_model(name, *model_and_spec(name), plan, exports, results)
            models.pop(name, None)  # benchmarks come last: the model is no longer needed
    results.complete = True
    results.seconds = round(time.perf_counter() - STARTED)
    results.save()
    print()
    print(text_table(SUMMARY_HEADER, summary_rows(results)))
    for line in results.notes + [f"ERROR {error}" for error in results.errors]:
        print(line)
    print(f"wrote {arguments.out / 'results.json'} and {arguments.out / 'results.md'}")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
