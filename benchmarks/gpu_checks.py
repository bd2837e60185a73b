"""Every GPU check and benchmark in one run; without CUDA it runs the CPU part of them.

    python -m benchmarks.gpu_checks --out DIR [--quick] [--models tiny,small,large] [--lengths 4096,65536]
                                    [--checks verify,benchmark,generation] [--threads N]

(from the repository root; benchmarks/README.md says how to run it on the device machine.)

1. Environment: Python, torch and its CUDA device, onnxruntime and the providers it lists, CPU and load.
2. Verification (models tiny, small and large): export to ONNX and TorchScript (fp32, and fp16 with CUDA),
   each with its verification twin, and run `exporters.verify.verify_export` (bucket replay and near-tie
   certificates) on ONNX Runtime CPU and CUDA and TorchScript CPU and CUDA at its default shapes, the longest
   at batch 1 (up to 4,096 tokens on the CPU runtimes; `large` only on CUDA). CUDA fp32 is strict (ORT
   `use_tf32=0`, torch TF32 off); one more ORT CUDA group runs with TF32 on, against eager with TF32 allowed,
   under the fp16 rule (TF32 keeps fp16's 10 mantissa bits).
3. Benchmarks (forward only, batch 1, random weights, random token ids, no padding): eager PyTorch, ONNX
   Runtime and TorchScript on the same device and precision (CUDA: fp32 strict, tf32, fp16; CPU: fp32).
   Each runtime's output is first compared with eager's at the timed shape, free-running (max abs and
   bucket flips, as information: the verdict is the verification step's). Timing: `warm-up` runs, then
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
`large` are the shapes at which transformers' Reformer was first timed on an H100 (SHAPES), built with
`max_position_embeddings` = the longest length benchmarked (so `num_buckets` follows the library's rule for
that length) and square axial positions.

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
VERIFIED_MODELS = ("tiny", "small", "large")  # large on CUDA only (its exports take minutes on the CPU)
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
# Benchmark lengths. GPU: those of the first timings of transformers' Reformer. CPU: what finishes in about
# 2 minutes on 2 cores.
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
    """Each (model, format, dtype, export device, twin or not) exported once, into a temporary folder.
    `prepare` exports many at once in worker processes (an export is mostly single-threaded Python: 1 to 1.5
    minutes for `large` on one core, and verification needs eight of them); `get` exports what is missing."""

    def __init__(self, folder: Path, results: "Results"):
        self.folder = folder
        self.results = results
        self.paths: dict[tuple, Path] = {}
        self.failures: dict[tuple, str] = {}

    def key(self, name: str, fmt: str, dtype: str, runtime_device: str, replay: bool = False) -> tuple:
        return (name, fmt, dtype, export_device(fmt, dtype, runtime_device), replay)

    def path_for(self, key: tuple) -> Path:
        name, fmt, dtype, device, replay = key
        return self.folder / f"{name}-{dtype}-{device}{'-twin' if replay else ''}.{'onnx' if fmt == 'onnx' else 'pt'}"

    def record(self, key: tuple, seconds: float) -> None:
        name, fmt, dtype, device, replay = key
        path = self.path_for(key)
        self.results.exports.append({"model": name, "format": fmt + ("-twin" if replay else ""), "dtype": dtype,
                                     "device": device, "seconds": round(seconds, 1),
                                     "megabytes": round(folder_bytes(path) / 1e6, 1)})
        self.paths[key] = path

    def prepare(self, jobs: list[tuple[tuple, int]]) -> None:
        """Export every (key, max_length) not exported yet, in parallel where the machine has the cores."""
        import concurrent.futures
        import multiprocessing

        missing = [(key, max_length) for key, max_length in dict(jobs).items() if key not in self.paths]
        workers = min(len(missing), (os.cpu_count() or 1) // 2)
        if workers < 2:
            return  # `get` exports them one by one
        log(f"exporting {len(missing)} graphs in {workers} processes ...")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(export_in_worker, key, max_length, str(self.path_for(key))): key
                       for key, max_length in missing}
            for future in concurrent.futures.as_completed(futures):
                key = futures[future]
                try:
                    self.record(key, future.result())
                    log(f"exported {self.path_for(key).name}")
                except Exception as error:  # recorded once; `get` raises it for every step that needs the file
                    self.results.fail(f"export {self.path_for(key).name}", error)
                    self.failures[key] = f"{type(error).__name__}: {error}".splitlines()[0]
        self.results.save()

    def get(self, name: str, model, spec, fmt: str, dtype: str, runtime_device: str, replay: bool = False) -> Path:
        """The file for a runtime on `runtime_device` (`replay`: its verification twin), exported on first use."""
        key = self.key(name, fmt, dtype, runtime_device, replay)
        if key in self.failures:
            raise RuntimeError(f"export of {self.path_for(key).name} failed earlier: {self.failures[key]}")
        if key not in self.paths:
            log(f"exporting {self.path_for(key).name} ...")
            start = time.perf_counter()
            export_file(model, spec, key, self.path_for(key))
            self.record(key, time.perf_counter() - start)
        return self.paths[key]


def export_file(model, spec, key: tuple, path: Path) -> None:
    from exporters.onnx import export_onnx
    from exporters.torchscript import export_torchscript

    _, fmt, dtype, device, replay = key
    exporter = export_onnx if fmt == "onnx" else export_torchscript
    exporter(model, spec, path, dtype=dtype, device=device, replay=replay)


def export_in_worker(key: tuple, max_length: int, path: str) -> float:
    """In a worker process: the same model as the parent's (same seed), exported to path; its seconds."""
    import torch

    torch.set_num_threads(2)
    model, spec = build_model(key[0], max_length)
    start = time.perf_counter()
    export_file(model, spec, key, Path(path))
    return time.perf_counter() - start


def folder_bytes(path: Path) -> int:
    """The file and its external-data file, if any."""
    return sum(candidate.stat().st_size for candidate in (path, path.with_name(path.name + ".data"))
               if candidate.exists())


# ----- runtimes -----

class RuntimeUnavailable(Exception):
    """A runtime that cannot run here (no CUDA provider, a session that fell back to the CPU)."""


def ort_providers(device: str) -> list[str]:
    """The providers for `device`; reformer.runtime.open_session gives CUDA its options (an arena grown by
    what runs ask for, so that its size means something; TF32 only when asked)."""
    return [CPU_PROVIDER] if device == "cpu" else [CUDA_PROVIDER, CPU_PROVIDER]


class OrtRunner:
    """An ONNX Runtime session on `device`; refuses to exist when CUDA was asked for and is not first in the
    session's providers (ONNX Runtime falls back to the CPU silently)."""

    def __init__(self, path: Path, device: str, tf32: bool = False, threads: int | None = None):
        from reformer.runtime import open_session

        self.device = device
        self.session = open_session(path, ort_providers(device), quiet=True, threads=threads, tf32=tf32)
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
    covers that; 2 x 65,536 would take minutes there); the longest at batch 1 (2 x 65,536 of `large` in fp32
    would need ~100 GiB of ONNX Runtime arena)."""
    from exporters.verify import default_shapes

    max_length = config.max_position_embeddings
    max_length = min(max_length, CPU_VERIFY_MAX_LENGTH) if device == "cpu" else max_length
    return [(1 if length == max_length else batch, length) for batch, length in default_shapes(config, max_length)]


def verification_plan(name: str, plan: Plan) -> list[tuple[str, str, str, bool]]:
    """(format, dtype, runtime, tf32) to verify for a model."""
    cases = [(fmt, dtype, runtime, False) for fmt, dtype, runtime in verification_cases(plan.device == "cuda")]
    if plan.device == "cuda":
        cases.append(("onnx", "fp32", "onnxruntime-cuda", True))
    # `large` on the CPU runtimes would take minutes per row at 65,536 tokens; the CPU runs verify enwik8.
    return [case for case in cases if name != "large" or case[2].endswith("cuda")]


def verification_exports(name: str, plan: Plan, exports: Exports) -> list[tuple]:
    """The export keys verification needs: every graph and its twin."""
    return [exports.key(name, fmt, dtype, runtime.split("-")[1], replay)
            for fmt, dtype, runtime, _ in verification_plan(name, plan) for replay in (False, True)]


def verify_model(name: str, model, spec, plan: Plan, exports: Exports, results: "Results") -> None:
    from exporters.verify import verify_export

    if plan.device != "cuda":
        results.notes.append(f"{name}: CUDA runtimes, TF32 and fp16 not verified (torch sees no CUDA device)")
    for fmt, dtype, runtime, tf32 in verification_plan(name, plan):
        runtime_device = runtime.split("-")[1]
        device = export_device(fmt, dtype, runtime_device)
        precision = "tf32" if tf32 else dtype

        def verify(fmt=fmt, dtype=dtype, runtime=runtime, runtime_device=runtime_device, device=device, tf32=tf32,
                   precision=precision):
            path = exports.get(name, model, spec, fmt, dtype, runtime_device)
            twin = exports.get(name, model, spec, fmt, dtype, runtime_device, replay=True)
            log(f"verifying {name} {fmt} {precision} on {runtime} ...")
            report = verify_export(model, spec, path, fmt, twin_path=twin, dtype=dtype, device=device, tf32=tf32,
                                   runtimes=[runtime], shapes=verification_shapes(model.config, runtime_device))
            results.add_verification(name, precision, report)

        run_step(results, f"verify {name} {fmt} {precision} {runtime}", verify)


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
    if runtime != "eager":  # free-running against eager at the timed shape, as information
        row.update(free_running_difference(runner, expected, spec, input_ids, attention_mask))
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


def free_running_difference(runner, expected, spec, input_ids, attention_mask) -> dict:
    """Max abs difference from eager's outputs (CPU tensors) and bucket flips, everything on the CPU."""
    from exporters.verify import VerificationRow, count_bucket_flips, output_error

    keep = attention_mask.bool().cpu()
    actual = [tensor.cpu() for tensor in runner.outputs(input_ids, attention_mask)]
    outputs = len(spec.output_names)
    max_abs, _ = output_error(spec, expected[:outputs], actual[:outputs], keep)
    flips = VerificationRow("", "", tuple(input_ids.shape), "")
    if len(actual) > outputs:  # a graph exported with bucket outputs
        count_bucket_flips(flips, expected[outputs:], actual[outputs:], keep)
    return {"max_abs": max_abs, "flips": flips.flips}


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
    _, decoder_report = export_causal_lm_with_past(model, str(directory), "onnx")
    results.exports.append({"model": name, "format": "onnx causal-lm-with-past", "dtype": "fp32", "device": "cpu",
                            "seconds": round(time.perf_counter() - start, 1),
                            "megabytes": round(sum(path.stat().st_size for path in directory.iterdir()) / 1e6, 1)})
    generator = OnnxGenerator(directory, providers=ort_providers(plan.device), threads=plan.threads)
    providers = generator.providers_in_use
    log(f"onnxruntime generator {name}: {providers}")
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
            **speeds, "same_tokens": same_tokens, "decoder_verified_max_abs": max(
                row.replay_max_abs for row in decoder_report.rows)})
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
    from reformer.files import atomic_write

    atomic_write(str(path), lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def verification_cell(rows: list[dict]) -> str:
    """A runtime's rows: verdict, worst replayed error, certified near-ties of all disagreements, and the
    free-running flips summed over the rows."""
    if not rows:
        return "-"
    worst = max(rows, key=lambda row: row["replay_max_abs"] if row["replay_max_abs"] == row["replay_max_abs"]
                else math.inf)
    certified = sum(row["certified"] for row in rows)
    disagreements = sum(row["disagreements"] for row in rows)
    flips = sum(row["flipped_buckets"] for row in rows)
    verdict = "pass" if all(row["passed"] for row in rows) else "FAIL"
    return f"{verdict} replay {worst['replay_max_abs']:.1e}, ties {certified}/{disagreements}, free flips {flips}"


def shape_span(rows: list[dict]) -> str:
    shapes = sorted({tuple(row["shape"]) for row in rows}, key=lambda shape: (shape[1], shape[0]))
    return f"{shapes[0][0]}x{shapes[0][1]}..{shapes[-1][0]}x{shapes[-1][1]}"


def timing_cell(row: dict | None) -> str:
    if row is None:
        return "-"
    return f"{row['median_ms']:.4g} ms"


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
        "Verification cells: verdict, worst replayed error, certified near-ties of all bucket disagreements, "
        "free-running flips. Benchmark cells: median ms.",
        "",
        markdown_table(SUMMARY_HEADER, summary_rows(results)),
        "",
        "## Verification",
        markdown_table(("model", "runtime", "device", "shape", "precision", "replay max abs", "tolerance",
                        "near-ties certified", "worst margin / bound", "free-running max abs", "free-running flips",
                        "first LSH layer flips", "result", "note", "card"), [
            (row["model"], row["runtime"], row["device"], f"{row['shape'][0]}x{row['shape'][1]}", row["precision"],
             f"{row['replay_max_abs']:.2e}", f"{row['tolerance']:.2g}", f"{row['certified']}/{row['disagreements']}",
             "-" if row["worst_margin"] is None else f"{abs(row['worst_margin']):.2e} / {row['worst_bound']:.2e}",
             f"{row['max_abs']:.2e}", f"{row['flipped_buckets']}/{row['total_buckets']}",
             f"{row['first_layer_flipped']}/{row['first_layer_total']}",
             "pass" if row["passed"] else "FAIL", row["note"], row["card"]) for row in results.verification]),
        "",
        "## Benchmarks (batch 1, forward only)",
        markdown_table(("model", "length", "precision", "runtime", "median ms", "min ms", "runs", "peak GiB (torch)",
                        "ORT device GiB", "free-running max abs vs eager", "flips", "providers", "card"), [
            (row["model"], row["length"], row["precision"], row["runtime"], f"{row['median_ms']:.4g}",
             f"{row['min_ms']:.4g}", row["runs"], number(row.get("peak_gib")), number(row.get("ort_device_gib")),
             "-" if "max_abs" not in row else f"{row['max_abs']:.2e}", row.get("flips", "-"),
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

    def max_length(name: str) -> int:
        return max(plan.lengths.get(name) or (DEFAULT_MAX_LENGTH.get(name, 256),))

    def model_and_spec(name: str):
        if name not in models:
            models[name] = build_model(name, max_length(name))
        return models[name]

    with tempfile.TemporaryDirectory(prefix="gpu-checks-") as folder:
        exports = Exports(Path(folder), results)
        if "verify" in plan.checks:
            exports.prepare([(key, max_length(name)) for name in plan.models if name in VERIFIED_MODELS
                             for key in verification_exports(name, plan, exports)])
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
