"""What one forward of an exported graph costs on ONNX Runtime CPU: nodes, bytes written, time, peak memory.

    python -m benchmarks.graph_cost --model small --length 16384 [--dtype fp32] [--threads 2] [--out FILE.md]
                                    [--onnx PATH] [--custom-ops auto] [--num-hashes N]
                                    [--time-lowerings standard,ort,onnx-attention]

(from the repository root). Exports the model (benchmarks/models.py; `--onnx` reuses a file exported with
`trace_metadata=True`), then, each in a fresh process so that nothing else is in its memory:

1. ONNX Runtime's profile of one forward (batch 1, random ids, nothing masked) after one warm-up: per node
   the bytes of its outputs and its time (bytes written leaves out the ops whose kernels alias their input,
   ALIASING_OPS; the total with them is printed too), summed by op type and by model part (embeddings, each layer, the
   head; the part comes from the module names the exporter records per node; nodes ONNX Runtime made by
   fusing others keep their first node's name where it does, and count as "fused" otherwise).
2. Peak resident memory: ONNX Runtime CPU (a session from reformer.runtime.open_session, as apps get it), and
   our eager PyTorch at the same shape and threads, each as the process's peak while loading and running two
   forwards minus its size after its imports: the median and range over MEMORY_REPEATS processes, and what
   loading alone takes.

Bytes written is the memory traffic a GPU pays for too (the CPU-side proxy of the attention's memory-bound
time), so it is the figure to watch when changing the model's hot paths.

`--time-lowerings` times forwards instead: the model exported once per `--custom-ops` mode named (all at
opset 23, the lowest that every mode accepts, so that only the lowering differs), one ONNX Runtime CPU session
each in this process, taking turns one forward at a time (benchmarks.gpu_checks.timing.time_interleaved) so
that a noisy spell of the machine lands on every mode. `--num-hashes` overrides the model's hashing rounds
(`small` has one; with more its LSH layers run the several-round attention op).
"""

from __future__ import annotations

import ast
import collections
import json
import multiprocessing
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks.cli import OneLineErrors
from benchmarks.models import MODEL_NAMES, build_model
from benchmarks.tables import markdown_table, text_table

GIB = 2**30
MEMORY_REPEATS = 5
# Ops whose ONNX Runtime kernels (CPU and CUDA) return their input's buffer under a new shape (`Alias(0, 0)` in
# their kernel definitions): the profile lists their outputs' bytes, but they write none.
ALIASING_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
LAYER_SCOPE = re.compile(r"\.layers\.(\d+)$")
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass
class Cost:
    """Bytes written and microseconds, summed over some nodes."""

    nodes: int = 0
    bytes_written: int = 0
    microseconds: int = 0

    def add(self, bytes_written: int, microseconds: int) -> None:
        self.nodes += 1
        self.bytes_written += bytes_written
        self.microseconds += microseconds


@dataclass
class GraphCost:
    graph_nodes: int
    executed_nodes: int
    by_op: dict[str, Cost] = field(default_factory=dict)
    by_part: dict[str, Cost] = field(default_factory=dict)
    onnxruntime_peak_bytes: int = 0
    eager_peak_bytes: int = 0
    onnxruntime_loaded_bytes: int = 0
    eager_loaded_bytes: int = 0
    onnxruntime_peak_range: tuple[int, int] = (0, 0)
    eager_peak_range: tuple[int, int] = (0, 0)

    @property
    def output_bytes(self) -> int:
        """Every node's outputs, as the profile lists them."""
        return sum(cost.bytes_written for cost in self.by_op.values())

    @property
    def bytes_written(self) -> int:
        """The outputs of the nodes that copy: what really goes to memory."""
        return sum(cost.bytes_written for op, cost in self.by_op.items() if op not in ALIASING_OPS)

    @property
    def microseconds(self) -> int:
        return sum(cost.microseconds for cost in self.by_op.values())


def node_parts(model, attn_layers: list[str]) -> dict[str, str]:
    """Node name -> model part ("embeddings", "layer 3 (lsh)", "head", ...) of an ONNX model proto, from the
    module names the exporter records per node (present when exported with trace_metadata=True)."""
    parts = {}
    for node in model.graph.node:
        scopes = next((ast.literal_eval(entry.value) for entry in node.metadata_props
                       if entry.key == NAME_SCOPES_KEY), [])
        parts[node.name] = model_part(scopes, attn_layers)
    return parts


def model_part(scopes: list[str], attn_layers: list[str]) -> str:
    for scope in reversed(scopes):
        match = LAYER_SCOPE.search(scope)
        if match:
            index = int(match.group(1))
            return f"layer {index} ({attn_layers[index]})"
    joined = " ".join(scopes)
    for name in ("embeddings", "encoder", "lm_head"):
        if name in joined:
            return "head" if name == "lm_head" else name
    return "model"


def random_ids(length: int, vocab_size: int):
    import numpy as np

    return np.random.default_rng(length).integers(1, vocab_size, (1, length), dtype=np.int64)


def resident_bytes(field_name: str, pid: int | str = "self") -> int:
    """VmRSS or VmHWM (the peak since the last reset) of this process or process `pid`, in bytes. OSError when
    that process is gone."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field_name} in /proc/{pid}/status")


def reset_peak() -> None:
    """Make VmHWM start again from the current size (Linux: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")


def profile_in_process(path: str, length: int, vocab_size: int, threads: int, folder: str) -> list[dict]:
    """In a fresh process: ONNX Runtime's profile events of the second of two forwards, in a session as apps
    get it (reformer.runtime.open_session)."""
    from reformer.runtime import CPU, open_session

    session = open_session(path, [CPU], threads=threads, profile_prefix=str(Path(folder) / "profile"))
    forward = onnxruntime_forward(session, length, vocab_size)
    for _ in range(2):
        forward()
    events = json.loads(Path(session.end_profiling()).read_text())
    last_run = [event for event in events if event.get("name") == "model_run"][-1]
    start, end = last_run["ts"], last_run["ts"] + last_run["dur"]
    return [event for event in events
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and start <= event["ts"] <= end]


def onnxruntime_forward(session, length: int, vocab_size: int) -> Callable[[], None]:
    ids = random_ids(length, vocab_size)
    feeds = {"input_ids": ids, "attention_mask": ids * 0 + 1}
    return lambda: session.run(None, feeds)


def resident_growth(load: Callable[[], Callable[[], None]]) -> tuple[int, int]:
    """(resident bytes once `load` has run, peak resident bytes over two runs of the forward it returns), both
    above the process's size before it. Two forwards, because ONNX Runtime may plan memory after the first."""
    baseline = resident_bytes("VmRSS")
    reset_peak()
    forward = load()
    loaded = resident_bytes("VmRSS") - baseline
    for _ in range(2):
        forward()
    return loaded, resident_bytes("VmHWM") - baseline


def onnxruntime_peak_in_process(path: str, length: int, vocab_size: int, threads: int) -> tuple[int, int]:
    """In a fresh process: resident_growth of a session as apps get it (reformer.runtime.open_session)."""
    from reformer.runtime import CPU, open_session

    return resident_growth(lambda: onnxruntime_forward(open_session(path, [CPU], threads=threads), length,
                                                         vocab_size))


def eager_peak_in_process(model_name: str, length: int, threads: int) -> tuple[int, int]:
    """In a fresh process: resident_growth of our eager model, built, then run under torch.inference_mode."""
    import torch

    torch.set_num_threads(threads)

    def load() -> Callable[[], None]:
        model, _ = build_model(model_name, length)
        ids = torch.from_numpy(random_ids(length, model.config.vocab_size))

        def forward() -> None:
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return forward

    return resident_growth(load)


def median_memory(function, *arguments) -> tuple[int, int, tuple[int, int]]:
    """(median loaded, median peak, (lowest peak, highest peak)) of MEMORY_REPEATS fresh processes: eager's
    peak varies from process to process (0.33 to 0.48 GiB for `small` at 16,384 tokens, with glibc's
    allocator), ONNX Runtime's much less."""
    runs = [in_fresh_process(function, *arguments) for _ in range(MEMORY_REPEATS)]
    peaks = [run[1] for run in runs]
    return statistics.median(run[0] for run in runs), statistics.median(peaks), (min(peaks), max(peaks))


def in_fresh_process(function, *arguments):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, arguments)


def measure(model_name: str, length: int, dtype: str, threads: int, custom_ops: str, onnx_path: Path | None
            ) -> GraphCost:
    import onnx

    from exporters.onnx import export_onnx

    model, spec = build_model(model_name, length)
    config = model.config
    with tempfile.TemporaryDirectory() as folder:
        path = onnx_path or Path(folder) / "model.onnx"
        if onnx_path is None:
            print(f"exporting {model_name} ({dtype}, max length {length}) ...", file=sys.stderr)
            export_onnx(model, spec, path, dtype=dtype, max_length=length, custom_ops=custom_ops,
                        trace_metadata=True)
        del model
        graph = onnx.load(str(path), load_external_data=False)
        parts, graph_nodes = node_parts(graph, config.attn_layers), len(graph.graph.node)
        del graph
        print("profiling one forward on ONNX Runtime CPU ...", file=sys.stderr)
        events = in_fresh_process(profile_in_process, str(path), length, config.vocab_size, threads, folder)
        cost = GraphCost(graph_nodes=graph_nodes, executed_nodes=len(events))
        by_op = collections.defaultdict(Cost)
        by_part = collections.defaultdict(Cost)
        for event in events:
            node_name = event["name"].removesuffix("_kernel_time")
            written, microseconds = int(event["args"].get("output_size", 0)), int(event["dur"])
            op = event["args"]["op_name"]
            by_op[op].add(written, microseconds)
            by_part[parts.get(node_name, "fused")].add(0 if op in ALIASING_OPS else written, microseconds)
        cost.by_op, cost.by_part = dict(by_op), dict(by_part)
        print("peak memory: ONNX Runtime CPU, then eager ...", file=sys.stderr)
        cost.onnxruntime_loaded_bytes, cost.onnxruntime_peak_bytes, cost.onnxruntime_peak_range = median_memory(
            onnxruntime_peak_in_process, str(path), length, config.vocab_size, threads)
    cost.eager_loaded_bytes, cost.eager_peak_bytes, cost.eager_peak_range = median_memory(
        eager_peak_in_process, model_name, length, threads)
    return cost


# Opset of every graph `--time-lowerings` times (exporters.ops.MODE_MIN_OPSET: onnx-attention needs 23).
TIMING_OPSET = 23
# At least TIMING_MIN_RUNS turns each: the shared 2-core machine's spells last longer than a few forwards.
TIMING_WARMUP, TIMING_MIN_RUNS, TIMING_MAX_RUNS = 2, 10, 20


def time_lowerings(model_name: str, length: int, dtype: str, threads: int, modes: list[str],
                   num_hashes: int | None) -> dict[str, list[float]]:
    """Milliseconds of each timed forward (batch 1, random ids, nothing masked) per mode, the modes' sessions
    taking turns."""
    from benchmarks.gpu_checks.timing import time_interleaved
    from exporters.onnx import export_onnx
    from reformer.runtime import CPU, open_session

    model, spec = build_model(model_name, length, num_hashes=num_hashes)
    forwards = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in modes:
            print(f"exporting {model_name} ({dtype}, max length {length}, custom ops {mode}) ...", file=sys.stderr)
            path = Path(folder) / f"{mode}.onnx"
            export_onnx(model, spec, path, opset=TIMING_OPSET, dtype=dtype, max_length=length, custom_ops=mode)
            forwards[mode] = onnxruntime_forward(open_session(str(path), [CPU], threads=threads), length,
                                                 model.config.vocab_size)
        print(f"timing {', '.join(modes)} in turns ...", file=sys.stderr)
        return time_interleaved(forwards, "cpu", TIMING_WARMUP, TIMING_MAX_RUNS, TIMING_MIN_RUNS)


def timing_rows(times: dict[str, list[float]]) -> list[tuple]:
    baseline = statistics.median(next(iter(times.values())))
    return [(mode, len(runs), f"{statistics.median(runs):.1f}", f"{min(runs):.1f}", f"{max(runs):.1f}",
             f"{statistics.median(runs) / baseline:.2f}") for mode, runs in times.items()]


TIMING_HEADER = ("custom ops", "runs", "median ms", "min ms", "max ms", "median / first")


def cost_rows(costs: dict[str, Cost], total: GraphCost, limit: int | None = None) -> list[tuple]:
    ordered = sorted(costs.items(), key=lambda item: -item[1].bytes_written)
    rows = [(name, cost.nodes, f"{cost.bytes_written / GIB:.3f}", f"{100 * cost.microseconds / total.microseconds:.1f}")
            for name, cost in ordered[:limit]]
    if limit is not None and len(ordered) > limit:
        rest = ordered[limit:]
        rows.append((f"{len(rest)} more", sum(cost.nodes for _, cost in rest),
                     f"{sum(cost.bytes_written for _, cost in rest) / GIB:.3f}",
                     f"{100 * sum(cost.microseconds for _, cost in rest) / total.microseconds:.1f}"))
    return rows


def memory_cell(peak: int, peak_range: tuple[int, int], loaded_name: str, loaded: int) -> str:
    return (f"{peak / GIB:.3f} GiB (median of {MEMORY_REPEATS} processes, {peak_range[0] / GIB:.3f} to "
            f"{peak_range[1] / GIB:.3f}; {loaded_name} alone {loaded / GIB:.3f})")


def report(cost: GraphCost, title: str, table) -> str:
    summary = [
        ("nodes in the file", cost.graph_nodes),
        ("nodes ONNX Runtime ran (after its fusions)", cost.executed_nodes),
        ("bytes written per forward", f"{cost.bytes_written / GIB:.3f} GiB"),
        ("output bytes incl. reshapes and other aliases", f"{cost.output_bytes / GIB:.3f} GiB"),
        ("node time per forward (profiled)", f"{cost.microseconds / 1000:.1f} ms"),
        ("peak resident memory, ONNX Runtime CPU", memory_cell(cost.onnxruntime_peak_bytes, cost.onnxruntime_peak_range,
                                                              "session", cost.onnxruntime_loaded_bytes)),
        ("peak resident memory, our eager PyTorch", memory_cell(cost.eager_peak_bytes, cost.eager_peak_range,
                                                                "model", cost.eager_loaded_bytes)),
    ]
    sections = [title, table(("figure", "value"), summary),
                "By op type (largest outputs first; Reshape and the other ALIASING_OPS write nothing):",
                table(("op", "nodes", "GiB written", "% time"), cost_rows(cost.by_op, cost, limit=15)),
                "By model part (bytes written):",
                table(("part", "nodes", "GiB written", "% time"), cost_rows(cost.by_part, cost))]
    return "\n\n".join(sections) + "\n"


def parse_arguments(argv=None):
    parser = OneLineErrors(prog="python -m benchmarks.graph_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODEL_NAMES, default="small", help="benchmarks/models.py (default small)")
    parser.add_argument("--length", type=int, default=16384, help="tokens, batch 1; also the export's max length")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="graph precision (default fp32)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of both runtimes (default 2)")
    parser.add_argument("--custom-ops", default="auto", help="lowerings, as reformer-export --custom-ops")
    parser.add_argument("--onnx", type=Path, help="profile this file (exported with trace_metadata=True for the "
                        "per-part table) instead of exporting")
    parser.add_argument("--num-hashes", type=int, help="hashing rounds of the model's LSH layers (default: "
                        "the model's)")
    parser.add_argument("--time-lowerings", metavar="MODE[,MODE...]",
                        help="time forwards of the graph under each of these --custom-ops modes, in turns, instead "
                             "of profiling one")
    parser.add_argument("--out", type=Path, help="also write the tables as markdown to this file")
    arguments = parser.parse_args(argv)
    if arguments.length < 1 or arguments.threads < 1:
        parser.error("--length and --threads must be positive")
    if arguments.num_hashes is not None and (arguments.num_hashes < 1 or arguments.model == "tiny"):
        parser.error("--num-hashes must be positive, and applies to small and large only")
    if arguments.time_lowerings is not None:
        from exporters.ops import CUSTOM_OPS_MODES

        arguments.time_lowerings = arguments.time_lowerings.split(",")
        unknown = [mode for mode in arguments.time_lowerings if mode not in CUSTOM_OPS_MODES]
        if unknown or len(set(arguments.time_lowerings)) < len(arguments.time_lowerings):
            parser.error(f"--time-lowerings: name distinct modes among {', '.join(CUSTOM_OPS_MODES)}"
                         + (f", not {', '.join(unknown)}" if unknown else ""))
        if arguments.onnx is not None:
            parser.error("--time-lowerings exports its own graphs: drop --onnx")
    if arguments.onnx is not None and not arguments.onnx.is_file():
        parser.error(f"--onnx {arguments.onnx}: no such file")
    return arguments


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    command = "python -m benchmarks.graph_cost " + " ".join(argv if argv is not None else sys.argv[1:])
    if arguments.time_lowerings is not None:
        times = time_lowerings(arguments.model, arguments.length, arguments.dtype, arguments.threads,
                               arguments.time_lowerings, arguments.num_hashes)
        hashes = "" if arguments.num_hashes is None else f", {arguments.num_hashes} hashing rounds"
        title = (f"{arguments.model}{hashes} @ {arguments.length:,} tokens, batch 1, {arguments.dtype}, ONNX Runtime "
                 f"CPU, {arguments.threads} threads, opset {TIMING_OPSET}, forwards in turns")
        print(title + "\n\n" + text_table(TIMING_HEADER, timing_rows(times)))
        if arguments.out:
            arguments.out.write_text(f"# Forward time per lowering: {title}\n\n`{command}`\n\n"
                                     + markdown_table(TIMING_HEADER, timing_rows(times)) + "\n")
        return 0
    cost = measure(arguments.model, arguments.length, arguments.dtype, arguments.threads, arguments.custom_ops,
                   arguments.onnx)
    title = (f"{arguments.model} @ {arguments.length:,} tokens, batch 1, {arguments.dtype}, ONNX Runtime CPU, "
             f"{arguments.threads} threads")
    print(report(cost, title, text_table))
    if arguments.out:
        arguments.out.write_text(report(cost, f"# Graph cost: {title}\n\n`{command}`", markdown_table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
