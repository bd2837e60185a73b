"""Speed and memory on the CPU beside the reference: transformers' Reformer, our eager PyTorch, ONNX Runtime fp32,
ONNX Runtime int8 (`--quantize int8`) and the AOTInductor package, in one run.

    python -m benchmarks.cpu_speed [--parts forward,memory,generation] [--model small] [--lengths 4096,16384]
                                   [--threads 1,2] [--memory-length 65536] [--memory-threads 2]
                                   [--memory-rounds 3] [--generation-models byte-lm,small] [--batches 1,8]
                                   [--prompt-length 64] [--new-tokens 128] [--generation-threads 1]
                                   [--no-aoti] [--out FILE.md]

(from the repository root). Models are benchmarks/models.py's (`small`: random weights, causal LM over bytes)
or a built-in model's name (`byte-lm`, trained). Every part compares each runtime with our eager at the shape
it times (largest difference, as information: the verifier judges files, this script times them).

1. forward: batch 1, random ids, nothing masked, at each of --lengths. The model is built and exported once for
   the longest length (fp32 ONNX, its int8 quantization, an AOTInductor package for this machine). Each thread
   count runs in a fresh process (torch, OpenMP and ONNX Runtime pinned to it), where the runtimes take turns,
   one forward each per round (benchmarks.gpu_checks.timing.time_interleaved), so a busy spell of a shared
   machine lands on all of them.
2. memory: one forward at --memory-length with --memory-threads, each runtime in a process of its own: its peak
   resident memory above the process's size after its imports (weights, session and two forwards: a warm-up and
   a timed one; benchmarks.graph_cost.resident_growth) and the timed forward's seconds. The processes take
   turns, runtime after runtime, for --memory-rounds rounds; the median is reported.
3. generation: greedy, --prompt-length tokens then --new-tokens, at each batch, taking turns: transformers'
   `generate` with its LSH cache, our eager `reformer.generation.generate` with ours, and `OnnxGenerator` over
   the fp32 and the int8 causal-lm-with-past export. Tokens/s counts new tokens of every row, prefill
   included. "same tokens as eager" says where a runtime's tokens first differ from our eager's.

The markdown file (--out) holds the processor, the load average before and after, the versions, the command
and the tables; the same tables are printed.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.cli import OneLineErrors
from benchmarks.gpu_checks.environment import environment_lines
from benchmarks.gpu_checks.timing import time_interleaved
from benchmarks.models import MODEL_NAMES
from benchmarks.tables import markdown_table, text_table

PARTS = ("forward", "memory", "generation")
REFERENCE, EAGER, ORT_FP32, ORT_INT8, AOTI = "transformers", "eager", "onnxruntime fp32", "onnxruntime int8", "aoti"
FORWARD_WARMUP, FORWARD_MIN_RUNS, FORWARD_MAX_RUNS = 2, 5, 20
GENERATION_WARMUP, GENERATION_MIN_RUNS, GENERATION_MAX_RUNS = 1, 3, 5
# benchmarks/models.py's shapes are built for this many positions in the generation part (the generation_speed
# and gpu_checks figures' `small`); the decoder graphs serve prompt plus new tokens.
GENERATION_MODEL_LENGTH = 4096


@dataclass
class Files:
    """The exported graphs of one model and its longest length."""

    model: str
    max_length: int
    vocab_size: int
    paths: dict[str, str] = field(default_factory=dict)  # runtime -> file
    megabytes: dict[str, float] = field(default_factory=dict)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_model(name: str, max_length: int):
    """(model, causal-lm spec, held-out windows: a function of the window length, giving None without held-out
    text): benchmarks/models.py's shapes with random weights, or a built-in model (an int8 graph's task verdict
    is judged on its held-out text, as the CLI judges it)."""
    if name in MODEL_NAMES:
        from benchmarks.models import build_model

        return (*build_model(name, max_length), lambda length: None)
    from exporters.models import resolve_model

    resolved = resolve_model(name, "causal-lm")
    return resolved.model, resolved.spec, resolved.held_out_windows


def export_files(name: str, max_length: int, aoti: bool, folder: str) -> Files:
    """fp32 ONNX, its int8 quantization (by the recipe the CLI takes: chosen on held-out text where the model
    ships one) and (with `aoti`) an AOTInductor package for this machine's ISA."""
    from exporters.aoti import export_aoti
    from exporters.onnx import export_onnx
    from exporters.quantize import quantize_graph

    model, spec, held_out_windows = load_model(name, max_length)
    files = Files(name, max_length, model.config.vocab_size)
    files.paths[ORT_FP32] = os.path.join(folder, f"{name}-{max_length}.onnx")
    files.paths[ORT_INT8] = os.path.join(folder, f"{name}-{max_length}-int8.onnx")
    log(f"exporting {name} for {max_length} tokens: ONNX fp32, int8 ...")
    export_onnx(model, spec, files.paths[ORT_FP32], max_length=max_length)
    quantize_graph(files.paths[ORT_FP32], files.paths[ORT_INT8], held_out_windows(max_length))
    if aoti:
        log(f"compiling the AOTInductor package of {name} for {max_length} tokens ...")
        files.paths[AOTI] = os.path.join(folder, f"{name}-{max_length}.pt2")
        export_aoti(model, spec, files.paths[AOTI], max_length=max_length, native_isa=True)
    files.megabytes = {runtime: os.path.getsize(path) / 1e6 for runtime, path in files.paths.items()}
    return files


def open_runners(files: Files, threads: int, runtimes: list[str]) -> dict:
    """The runtimes named, each an exporters.runners.Runner (benchmarks.gpu_checks.runners), on the CPU with
    `threads`."""
    from benchmarks.gpu_checks.runners import open_graph, open_onnx, reference_runner
    from benchmarks.models import reference_model
    from exporters.runners import module_runner

    model, spec, _ = load_model(files.model, files.max_length)
    openers = {
        REFERENCE: lambda: reference_runner(reference_model(model), "cpu"),
        EAGER: lambda: module_runner(spec.wrap(model), "cpu", tf32=False),
        ORT_FP32: lambda: open_onnx(files.paths[ORT_FP32], "cpu", threads=threads),
        ORT_INT8: lambda: open_onnx(files.paths[ORT_INT8], "cpu", threads=threads),
        AOTI: lambda: open_graph("aoti", files.paths[AOTI], "cpu"),
    }
    return {runtime: openers[runtime]() for runtime in runtimes}


def pin_threads(threads: int) -> None:
    """torch's and OpenMP's threads (AOTInductor's kernels are OpenMP loops); in a fresh process, before torch
    starts its pool. ONNX Runtime's are set per session."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def difference(expected, actual) -> dict:
    """Largest absolute difference of the logits, relative to eager's largest, and top-1 agreement."""
    expected, actual = expected.double(), actual.double()
    return {"relative": ((expected - actual).abs().max() / expected.abs().max()).item(),
            "top1": (expected.argmax(-1) == actual.argmax(-1)).double().mean().item()}


def forward_in_process(files: Files, lengths: list[int], threads: int, runtimes: list[str]) -> list[dict]:
    """In a fresh process: every runtime at every length, compared with eager, then timed taking turns."""
    pin_threads(threads)
    import torch

    from benchmarks.gpu_checks.benchmark import benchmark_inputs

    runners = open_runners(files, threads, runtimes)
    rows = []
    for length in lengths:
        inputs = list(benchmark_inputs(length, files.vocab_size))
        with torch.no_grad():
            expected = runners[EAGER].run(inputs)[0]
            differences = {runtime: difference(expected, runner.run(inputs)[0])
                           for runtime, runner in runners.items() if runtime != EAGER}
            log(f"timing {', '.join(runners)} at {length} tokens, {threads} thread(s), taking turns ...")
            times = time_interleaved({runtime: runner.prepared_call(inputs) for runtime, runner in runners.items()},
                                     "cpu", FORWARD_WARMUP, FORWARD_MAX_RUNS, FORWARD_MIN_RUNS)
        for runtime, milliseconds in times.items():
            rows.append({"threads": threads, "length": length, "runtime": runtime,
                         "median_ms": statistics.median(milliseconds), "min_ms": min(milliseconds),
                         "runs": len(milliseconds), **differences.get(runtime, {})})
    return rows


def in_fresh_process(function, *arguments):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, arguments)


def memory_in_process(files: Files, length: int, threads: int, runtime: str) -> dict:
    """In a fresh process: one runtime's peak resident memory over loading and two forwards (the second timed)
    above the process's size after its imports."""
    pin_threads(threads)
    import_every_runtime()
    import torch

    from benchmarks.gpu_checks.benchmark import benchmark_inputs
    from benchmarks.graph_cost import resident_growth

    seconds = []

    def load():
        runner = open_runners(files, threads, [runtime])[runtime]
        forward = runner.prepared_call(list(benchmark_inputs(length, files.vocab_size)))

        def timed_forward():
            start = time.perf_counter()
            with torch.no_grad():
                forward()
            seconds.append(time.perf_counter() - start)
        return timed_forward

    loaded, peak = resident_growth(load)
    return {"runtime": runtime, "loaded_bytes": loaded, "peak_bytes": peak, "seconds": seconds[-1]}


def import_every_runtime() -> None:
    """Every runtime's libraries, imported before a memory measurement starts, so that no runtime is charged
    for its imports (or another's)."""
    import importlib

    for module in ("torch", "onnxruntime", "transformers", "torch._inductor.package", "exporters.aoti",
                   "exporters.onnx", "exporters.specs", "reformer.runtime", "benchmarks.gpu_checks.runners"):
        importlib.import_module(module)


def generation_rows(name: str, batches: list[int], prompt_length: int, new_tokens: int, threads: int,
                    folder: str) -> list[dict]:
    """Greedy generation of every runtime at every batch, taking turns, in this process."""
    import numpy as np
    import torch

    from benchmarks.models import reference_model
    from exporters.decoder import export_causal_lm_with_past
    from reformer.generation import generate
    from reformer.runtime import CPU, OnnxGenerator

    torch.set_num_threads(threads)
    model, _, held_out_windows = load_model(name, GENERATION_MODEL_LENGTH)
    generators = {}
    for runtime, quantize in ((ORT_FP32, None), (ORT_INT8, "int8")):
        directory = os.path.join(folder, f"{name}-decoder-{runtime.split()[-1]}")
        log(f"exporting {name} as causal-lm-with-past ({runtime}) ...")
        export_causal_lm_with_past(model, directory, "onnx", max_length=prompt_length + new_tokens, quantize=quantize,
                                   held_out=held_out_windows(prompt_length + new_tokens))
        generators[runtime] = OnnxGenerator(directory, providers=[CPU], threads=threads)
    reference = reference_model(model)
    rows = []
    for batch in batches:
        prompt = torch.randint(1, model.config.vocab_size, (batch, prompt_length),
                               generator=torch.Generator().manual_seed(batch))
        tokens = {}

        def keep(runtime, run):
            def call():
                tokens[runtime] = np.asarray(run())
            return call

        calls = {
            REFERENCE: keep(REFERENCE, lambda: reference_generate(reference, prompt, new_tokens)),
            EAGER: keep(EAGER, lambda: generate(model, prompt, new_tokens)),
            **{runtime: keep(runtime, lambda generator=generator: generator.generate(prompt.numpy(), new_tokens))
               for runtime, generator in generators.items()},
        }
        log(f"generating {new_tokens} tokens at batch {batch} with {name}, taking turns ...")
        with torch.no_grad():
            times = time_interleaved(calls, "cpu", GENERATION_WARMUP, GENERATION_MAX_RUNS, GENERATION_MIN_RUNS)
        for runtime, milliseconds in times.items():
            seconds = statistics.median(milliseconds) / 1e3
            rows.append({"model": name, "batch": batch, "runtime": runtime, "seconds": seconds,
                         "tokens_per_second": batch * new_tokens / seconds, "runs": len(milliseconds),
                         "same_tokens": token_agreement(tokens[EAGER], tokens[runtime], prompt_length)})
    return rows


def reference_generate(reference, prompt, new_tokens: int):
    """transformers' greedy `generate` with its LSH cache. It prints a line to stdout for each generation input
    Reformer's forward does not take, every step: kept out of the tables."""
    import torch

    with contextlib.redirect_stdout(io.StringIO()):
        return reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)


def token_agreement(expected, actual, prompt_length: int) -> str:
    """'yes', or how many rows differ from eager's tokens and the first new token where one does."""
    differing = expected[:, prompt_length:] != actual[:, prompt_length:]
    rows = differing.any(axis=1)
    if not rows.any():
        return "yes"
    first = int(differing.argmax(axis=1)[rows].min()) + 1
    return f"no: {int(rows.sum())} of {len(rows)} rows, first at new token {first}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    """numerator / denominator as a speed-up, "-" where the row to compare with was not measured."""
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"


def forward_table(rows: list[dict], files: Files) -> tuple[list[str], list[tuple]]:
    header = ["threads", "tokens", "runtime", "median ms", "min ms", "runs", "speed-up vs transformers",
              "vs ORT fp32", "max diff / eager's max", "top-1 agree", "file MB"]
    table = []
    for row in rows:
        same_shape = {other["runtime"]: other["median_ms"] for other in rows
                      if (other["threads"], other["length"]) == (row["threads"], row["length"])}
        table.append((row["threads"], f"{row['length']:,}", row["runtime"], f"{row['median_ms']:.1f}",
                      f"{row['min_ms']:.1f}", row["runs"], ratio(same_shape.get(REFERENCE), row["median_ms"]),
                      ratio(same_shape.get(ORT_FP32), row["median_ms"]),
                      f"{row['relative']:.2e}" if "relative" in row else "-",
                      f"{row['top1']:.2%}" if "top1" in row else "-",
                      f"{files.megabytes[row['runtime']]:.2f}" if row["runtime"] in files.megabytes else "-"))
    return header, table


def memory_table(rows: list[dict]) -> tuple[list[str], list[tuple]]:
    header = ["runtime", "peak resident GiB (median)", "range", "loaded GiB", "forward s (median)", "processes",
              "peak vs transformers"]
    by_runtime: dict[str, list[dict]] = {}
    for row in rows:
        by_runtime.setdefault(row["runtime"], []).append(row)
    reference_peak = statistics.median(row["peak_bytes"] for row in by_runtime.get(REFERENCE, [{"peak_bytes": 0}]))
    table = []
    for runtime, runs in by_runtime.items():
        peaks = [run["peak_bytes"] for run in runs]
        table.append((runtime, f"{statistics.median(peaks) / 2**30:.3f}",
                      f"{min(peaks) / 2**30:.3f} to {max(peaks) / 2**30:.3f}",
                      f"{statistics.median(run['loaded_bytes'] for run in runs) / 2**30:.3f}",
                      f"{statistics.median(run['seconds'] for run in runs):.3f}", len(runs),
                      f"{statistics.median(peaks) / reference_peak:.2f}x" if reference_peak else "-"))
    return header, table


def generation_table(rows: list[dict]) -> tuple[list[str], list[tuple]]:
    header = ["model", "batch", "runtime", "seconds (median)", "tokens/s", "vs transformers", "vs ORT fp32", "runs",
              "same tokens as eager"]
    table = []
    for row in rows:
        same_batch = {other["runtime"]: other["tokens_per_second"] for other in rows
                      if (other["model"], other["batch"]) == (row["model"], row["batch"])}
        table.append((row["model"], row["batch"], row["runtime"], f"{row['seconds']:.3f}",
                      f"{row['tokens_per_second']:,.0f}", ratio(row["tokens_per_second"], same_batch.get(REFERENCE)),
                      ratio(row["tokens_per_second"], same_batch.get(ORT_FP32)), row["runs"], row["same_tokens"]))
    return header, table


def numbers(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value]


def parse_arguments(argv=None):
    parser = OneLineErrors(prog="python -m benchmarks.cpu_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--model", default="small", help="forward and memory model: benchmarks/models.py's or built-in")
    parser.add_argument("--lengths", type=numbers, default=[4096, 16384], help="forward lengths")
    parser.add_argument("--threads", type=numbers, default=[1, 2], help="forward thread counts")
    parser.add_argument("--memory-length", type=int, default=65536)
    parser.add_argument("--memory-threads", type=int, default=2)
    parser.add_argument("--memory-rounds", type=int, default=3, help="processes per runtime, taking turns")
    parser.add_argument("--generation-models", default="byte-lm,small")
    parser.add_argument("--batches", type=numbers, default=[1, 8])
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--generation-threads", type=int, default=1)
    parser.add_argument("--no-aoti", action="store_true", help="leave out the AOTInductor package (a compile each)")
    parser.add_argument("--out", help="write the tables and the environment to this markdown file")
    args = parser.parse_args(argv)
    args.parts = [part for part in args.parts.split(",") if part]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part {', '.join(sorted(unknown))}: choose from {', '.join(PARTS)}")
    if min(args.threads + [args.memory_threads, args.generation_threads]) < 1 or min(args.lengths) < 1:
        parser.error("thread counts and lengths must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_arguments(argv)
    command = "python -m benchmarks.cpu_speed " + shlex.join(sys.argv[1:] if argv is None else argv)
    load_before = os.getloadavg()
    runtimes = [REFERENCE, EAGER, ORT_FP32, ORT_INT8] + ([] if args.no_aoti else [AOTI])
    sections = []
    with tempfile.TemporaryDirectory(prefix="cpu-speed-") as folder:
        if "forward" in args.parts:
            files = export_files(args.model, max(args.lengths), not args.no_aoti, folder)
            rows = [row for threads in args.threads
                    for row in in_fresh_process(forward_in_process, files, args.lengths, threads, runtimes)]
            sections.append((f"Forward, `{args.model}` (built for {files.max_length:,} tokens), batch 1, each thread "
                             f"count in its own process, runtimes taking turns", *forward_table(rows, files)))
        if "memory" in args.parts:
            files = export_files(args.model, args.memory_length, not args.no_aoti, folder)
            rows = [in_fresh_process(memory_in_process, files, args.memory_length, args.memory_threads, runtime)
                    for _ in range(args.memory_rounds) for runtime in runtimes]
            sections.append((f"Memory, `{args.model}` at {args.memory_length:,} tokens, {args.memory_threads} threads, "
                             f"each runtime in its own process", *memory_table(rows)))
        if "generation" in args.parts:
            rows = [row for name in args.generation_models.split(",") if name
                    for row in generation_rows(name, args.batches, args.prompt_length, args.new_tokens,
                                               args.generation_threads, folder)]
            sections.append((f"Greedy generation, prompt {args.prompt_length} tokens, {args.new_tokens} new, "
                             f"{args.generation_threads} thread(s), runtimes taking turns", *generation_table(rows)))
    environment = environment_lines(command, load_before, os.getloadavg(), ("torch", "onnxruntime", "transformers"))
    print("\n".join(environment))
    for title, header, table in sections:
        print(f"\n{title}\n{text_table(header, table)}")
    if args.out:
        body = [f"## {title}\n\n{markdown_table(header, table)}" for title, header, table in sections]
        Path(args.out).write_text("# CPU speed beside the reference\n\n" + "\n".join(environment) + "\n\n"
                                  + "\n\n".join(body) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
