"""What a run found: `Results` (saved as results.json and results.md after every step) and its tables."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.gpu_checks.environment import card_name, load_average
from benchmarks.gpu_checks.generation import GENERATION_NEW_TOKENS, GENERATION_PROMPT
from benchmarks.gpu_checks.plan import FUSED_ONNX_RUNTIMES
from benchmarks.graph_cost import GIB
from benchmarks.tables import markdown_table

BENCHMARKED_RUNTIMES = ("eager", "onnxruntime", "torchscript", "transformers")
# Runtimes with a summary column only when a run timed them (the fused ONNX Runtime graphs are timed on CUDA
# only, AOTInductor packages with CUDA or --aoti).
OPTIONAL_RUNTIMES = (*FUSED_ONNX_RUNTIMES, "aoti")


@dataclass
class Results:
    out: Path
    command: str
    environment: dict
    plan: dict
    verification: list[dict] = field(default_factory=list)
    benchmarks: list[dict] = field(default_factory=list)
    generation: list[dict] = field(default_factory=list)
    cost: list[dict] = field(default_factory=list)
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

    def add_verification(self, model: str, precision: str, report, custom_ops: str = "auto") -> None:
        """custom_ops: the lowering of the verified ONNX graph (exporters.onnx.export_onnx), "auto" otherwise."""
        for row in report.rows:
            self.verification.append({"model": model, "precision": precision, "card": self.card(row.device),
                                      "custom_ops": custom_ops, **row.to_dict()})
        self.notes += [f"verify {model} {precision}: skipped {reason}" for reason in report.skipped]

    def add_benchmark(self, model: str, length: int, mode: str, device: str, row: dict) -> None:
        self.benchmarks.append({"model": model, "length": length, "batch": 1, "precision": mode, "device": device,
                                "card": self.card(device), **row})

    def add_generation(self, model: str, batch: int, device: str, providers: list, speeds: dict) -> None:
        self.generation.append({"model": model, "batch": batch, "prompt": GENERATION_PROMPT,
                                "new_tokens": GENERATION_NEW_TOKENS, "precision": "fp32", "device": device,
                                "card": self.card(device), "onnxruntime_providers": providers, **speeds})

    def add_cost(self, model: str, length: int, threads: int, cost) -> None:
        """benchmarks.graph_cost.GraphCost's totals (its per-op and per-part tables are graph_cost's own report)."""
        self.cost.append({"model": model, "length": length, "batch": 1, "dtype": "fp32", "device": "cpu",
                          "card": self.card("cpu"), "threads": threads, "graph_nodes": cost.graph_nodes,
                          "executed_nodes": cost.executed_nodes, "bytes_written": cost.bytes_written,
                          "node_ms": cost.microseconds / 1000,
                          "onnxruntime_peak_bytes": cost.onnxruntime_peak_bytes,
                          "eager_peak_bytes": cost.eager_peak_bytes})

    @property
    def failed(self) -> bool:
        return bool(self.errors) or any(not row["passed"] for row in self.verification)

    def to_dict(self) -> dict:
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "out"}

    def save(self) -> None:
        self.environment["load_average_now"] = load_average()
        write_atomically(self.out / "results.json", json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        write_atomically(self.out / "results.md", markdown_report(self))


def write_atomically(path: Path, text: str) -> None:
    from reformer.files import atomic_write

    atomic_write(str(path), lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def runtime_label(row: dict) -> str:
    """A verification row's runtime, with its graph's lowering where that is not the default."""
    custom_ops = row.get("custom_ops", "auto")  # results.json of runs before the fused lowerings have none
    return row["runtime"] if custom_ops == "auto" else f"{row['runtime']} custom_ops={custom_ops}"


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


def gib(value_bytes: int) -> str:
    return f"{value_bytes / GIB:.3g} GiB"


def summary_runtimes(results: Results) -> tuple[str, ...]:
    """The summary's runtime columns: BENCHMARKED_RUNTIMES, then those of OPTIONAL_RUNTIMES the run timed or
    verified."""
    ran = {row["runtime"] for row in (*results.benchmarks, *results.verification)}
    return BENCHMARKED_RUNTIMES + tuple(runtime for runtime in OPTIONAL_RUNTIMES if runtime in ran)


def summary_header(results: Results) -> tuple[str, ...]:
    return ("check", "model", "shape", "precision", *summary_runtimes(results), "card")


def summary_rows(results: Results) -> list[tuple]:
    """One row per verification group, benchmark shape, generation batch and cost; the card on every row."""
    runtimes = summary_runtimes(results)

    def summary_row(check: str, model: str, shape: str, precision: str, cells, card: str) -> tuple:
        """`cells` fill the runtime columns from the first; "-" in the rest."""
        return (check, model, shape, precision, *cells, *["-"] * (len(runtimes) - len(cells)), card)

    rows = []
    groups: dict[tuple, list[dict]] = {}
    for row in results.verification:
        groups.setdefault((row["model"], row["device"], row["precision"], row.get("custom_ops", "auto")),
                          []).append(row)
    for (model, device, precision, custom_ops), members in groups.items():
        cells = ["reference" if runtime == "eager" else verification_cell(
            [row for row in members if row["runtime"] == runtime]) for runtime in runtimes]
        lowering = "" if custom_ops == "auto" else f" custom_ops={custom_ops}"
        rows.append(summary_row("verify", model, shape_span(members), f"{precision} {device}{lowering}", cells,
                                results.card(device)))
    shapes: dict[tuple, dict[str, dict]] = {}
    for row in results.benchmarks:
        shapes.setdefault((row["model"], row["length"], row["precision"], row["device"]), {})[row["runtime"]] = row
    for (model, length, precision, device), by_runtime in shapes.items():
        rows.append(summary_row("benchmark", model, f"1x{length}", f"{precision} {device}",
                                [timing_cell(by_runtime.get(runtime)) for runtime in runtimes], results.card(device)))
    for row in results.generation:
        same = "same tokens" if row["same_tokens"] else "TOKENS DIFFER"
        rows.append(summary_row("generate", row["model"], f"batch {row['batch']}", f"fp32 {row['device']}", (
            f"{row['eager']['tokens_per_second']:.0f} tok/s",
            f"{row['onnxruntime']['tokens_per_second']:.0f} tok/s, {same}"), row["card"]))
    for row in results.cost:
        rows.append(summary_row("cost", row["model"], f"1x{row['length']}", f"fp32 {row['device']}", (
            f"peak {gib(row['eager_peak_bytes'])}",
            (f"{gib(row['bytes_written'])} written, {row['executed_nodes']} nodes, "
             f"peak {gib(row['onnxruntime_peak_bytes'])}")), row["card"]))
    return rows


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
        ("Verification cells: verdict, worst replayed error, certified near-ties of all bucket disagreements, "
         "free-running flips. Benchmark cells: median ms (transformers: its Reformer with the same weights, the "
         "reference; on CUDA, onnxruntime-fused: the graph with chunk attention as ONNX Runtime's fused "
         "MultiHeadAttention, custom_ops \"ort\", and onnxruntime-attention: as ONNX's Attention op, custom_ops "
         "\"onnx-attention\", opset 23). Cost cells: ONNX Runtime CPU bytes written per forward, nodes "
         "run, peak resident memory."),
        "",
        markdown_table(summary_header(results), summary_rows(results)),
        "",
        "## Verification",
        markdown_table(("model", "runtime", "device", "shape", "precision", "replay max abs", "tolerance",
                        "near-ties certified", "worst margin / bound", "free-running max abs", "free-running flips",
                        "first LSH layer flips", "result", "note", "card"), [
            (row["model"], runtime_label(row), row["device"], f"{row['shape'][0]}x{row['shape'][1]}", row["precision"],
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
        "## Graph cost (benchmarks/graph_cost.py: ONNX Runtime CPU, batch 1, fp32)",
        markdown_table(("model", "length", "threads", "nodes in the file", "nodes ORT ran", "GiB written",
                        "node ms (profiled)", "ORT peak GiB", "eager peak GiB", "card"), [
            (row["model"], row["length"], row["threads"], row["graph_nodes"], row["executed_nodes"],
             f"{row['bytes_written'] / GIB:.3f}", f"{row['node_ms']:.1f}", f"{row['onnxruntime_peak_bytes'] / GIB:.3f}",
             f"{row['eager_peak_bytes'] / GIB:.3f}", row["card"]) for row in results.cost]),
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
