"""Verification: run an exported graph on every runtime present and compare it with eager PyTorch on the same
device and precision, at several shapes (batch 1 and > 1; length 1, below one chunk, odd, maximum; tail-padded
masks), checking output names, then shapes, then values.

LSH makes a plain output comparison useless on long inputs: a rounding difference at a hashing near-tie
moves a token to another bucket, it attends to other keys, the next layer hashes another vector, and the
difference cascades (measured: 2 first-layer flips of 1M became 13,779 over 6 LSH layers, max abs 0.42, on a
correct graph). So every graph with LSH layers is checked in two separate parts, each exactly:

1. Bucket replay: the verification twin of the graph (same export path, eager's buckets as extra inputs
   forced in every LSH layer, see exporters.specs.ExportWrapper) runs on the same inputs. With the hashing
   taken out, what is left is arithmetic, and the replayed outputs must be within the precision's tolerance:
   `PRECISIONS[...].relative_tolerance` times the output scale (the largest eager magnitude, at least 1), or
   an absolute `atol` when one is given (see exporters.near_ties for why 1e-5 in fp32, 1e-2 in fp16/TF32).
2. Near-tie certificates: every bucket the twin's hashing would have chosen differently from eager, in every
   LSH layer, and every first-LSH-layer bucket of the shipped graph itself (whose input there differs from
   eager's by rounding only), must be a certified near-tie (exporters.near_ties: eager's float64 margin
   below a bound on the projection's rounding error). A larger margin means the graph hashes something else.

A row passes iff names and shapes match, the replayed outputs are within tolerance and every disagreement
is certified. The shipped graph's own outputs are compared too (max abs, flips in every layer): reported as
information, not judged, except that NaN fails. A graph without LSH layers has nothing to replay: its own
outputs are judged. The twin must differ from the shipped graph only in where the buckets come from:
`twin_node_difference` compares their node lists, and a shipped node the twin lacks fails the report.

Errors are measured over the positions the attention mask keeps (outputs at masked positions are not
defined, see tests/reformer/test_parity.py); max rel = max abs / the output scale."""

from __future__ import annotations

import collections
import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from .errors import ExportError, first_line
from .near_ties import PRECISIONS, Disagreement, certify, lsh_layers, recorded_hash_inputs
from .precision import check_device, model_as
from .specs import TaskSpec, example_length
from .task_verdict import Sample, TaskVerdict, judge

FORMATS = ("onnx", "aoti", "torchscript")
RUNTIMES = {"onnx": ("onnxruntime-cpu", "onnxruntime-cuda"), "aoti": ("aoti-cpu", "aoti-cuda"),
            "torchscript": ("torchscript-cpu", "torchscript-cuda")}


@dataclass
class Runner:
    """A loaded graph: `run(tensors)` takes the graph's inputs in order (CPU tensors; a twin's forced buckets
    after input_ids and attention_mask) and returns its outputs as CPU tensors. `output_names`: what the
    file calls its outputs (None where the format names none)."""

    run: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    device: str
    output_names: list[str] | None = None


@dataclass
class VerificationRow:
    runtime: str
    device: str
    shape: tuple[int, int]  # batch, length
    dtype: str  # precision: fp32 (strict), tf32 or fp16
    tolerance: float = float("nan")
    # Judged: the twin with eager's buckets forced (the shipped graph itself when there is nothing to replay).
    replay_max_abs: float = float("nan")
    replay_max_rel: float = float("nan")
    # Near-tie certificates: disagreements with eager's buckets (the twin's, every layer, and the shipped
    # graph's first LSH layer), how many are certified, and the one closest to (or past) its bound.
    disagreements: int = 0
    certified: int = 0
    worst_margin: float | None = None
    worst_bound: float | None = None
    worst_disagreement: str = ""
    # Information: the shipped graph running freely.
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    flipped_buckets: int = 0
    total_buckets: int = 0
    first_layer_flipped: int = 0
    first_layer_total: int = 0
    replayed: bool = False
    passed: bool = False
    note: str = ""

    @property
    def flips(self) -> str:
        """Flipped of total bucket assignments, exactly: a percentage would round a few flips away."""
        return f"{self.flipped_buckets}/{self.total_buckets}" if self.total_buckets else "-"


@dataclass
class VerificationReport:
    format: str
    path: str
    rows: list[VerificationRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # runtimes not present, with the reason
    twin_extra_nodes: dict[str, int] = field(default_factory=dict)  # node kinds only the twin has
    twin_missing_nodes: dict[str, int] = field(default_factory=dict)  # shipped node kinds the twin lacks
    # Quantized graphs only: one per runtime (exporters.task_verdict), judged instead of the rows' tolerance.
    task_verdicts: list[TaskVerdict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (bool(self.rows) and all(row.passed for row in self.rows) and not self.twin_missing_nodes
                and all(verdict.passed for verdict in self.task_verdicts))

    def to_dict(self) -> dict:
        return {"format": self.format, "path": self.path, "passed": self.passed,
                "rows": [asdict(row) for row in self.rows], "skipped": list(self.skipped),
                "twin_extra_nodes": dict(self.twin_extra_nodes), "twin_missing_nodes": dict(self.twin_missing_nodes),
                "task_verdicts": [asdict(verdict) for verdict in self.task_verdicts]}

    def summary_table(self) -> str:
        header = ("runtime", "device", "shape", "dtype", "replay abs", "replay rel", "tolerance", "near-ties",
                  "worst margin/bound", "free abs", "free flips", "result")
        lines = [header]
        for row in self.rows:
            certified = f"{row.certified}/{row.disagreements}" if row.replayed else "-"
            worst = "-" if row.worst_margin is None else f"{abs(row.worst_margin):.1e}/{row.worst_bound:.1e}"
            lines.append((row.runtime, row.device, f"{row.shape[0]}x{row.shape[1]}", row.dtype,
                          f"{row.replay_max_abs:.2e}", f"{row.replay_max_rel:.2e}",
                          f"{row.tolerance:.2g}" if row.tolerance == row.tolerance else "-",
                          certified, worst, f"{row.max_abs:.2e}", row.flips, "pass" if row.passed else "FAIL"))
        widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
        text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
        text += [f"{row.runtime} {row.device} {row.shape[0]}x{row.shape[1]}: {row.note}"
                 for row in self.rows if row.note]
        if self.twin_extra_nodes or self.twin_missing_nodes:
            text.append(f"verification twin: {twin_difference_text(self.twin_extra_nodes, self.twin_missing_nodes)}")
        if self.task_verdicts:
            text.append("int8 graph: its replayed and free-running errors and bucket disagreements (certified within "
                        "fp32 rounding / all) are information; the task verdict judges it")
        text += [verdict.summary() for verdict in self.task_verdicts]
        text += [f"skipped {reason}" for reason in self.skipped]
        return "\n".join(text)

    def failure_message(self) -> str:
        """One line naming the worst failing row and its numbers ('' when the report passed)."""
        if self.twin_missing_nodes:
            return f"the verification twin is not the shipped graph: {twin_difference_text({}, self.twin_missing_nodes)}"
        failing = [row for row in self.rows if not row.passed]
        failing_verdicts = [verdict for verdict in self.task_verdicts if not verdict.passed]
        if not failing and failing_verdicts:
            verdict = failing_verdicts[0]
            return f"the quantized graph fails its task on {verdict.runtime}: {verdict.note}"
        if not failing:
            return "" if self.rows else "verification ran on no runtime"
        worst = max(failing, key=lambda row: row.replay_max_abs / row.tolerance
                    if row.replay_max_abs == row.replay_max_abs else float("inf"))
        return (f"{len(failing)} of {len(self.rows)} checks failed; worst: {worst.runtime} {worst.device} "
                f"{worst.shape[0]}x{worst.shape[1]} {worst.dtype}: {worst.note}")


def twin_difference_text(extra: dict[str, int], missing: dict[str, int]) -> str:
    listed = lambda counts: ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items()))  # noqa: E731
    parts = ([f"adds {listed(extra)} (taking the forced buckets, returning its own)"] if extra else []) + (
        [f"lacks {listed(missing)} of the shipped graph"] if missing else [])
    return "; ".join(parts)


def onnxruntime_providers() -> list[str]:
    """Execution providers this onnxruntime build lists (none without onnxruntime). Listing is not running:
    onnxruntime-gpu lists CUDA on machines without a GPU; `verify_export` checks the session's providers."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def verify_export(
    model,
    spec: TaskSpec,
    path,
    fmt: str,
    *,
    twin_path=None,
    dtype: str = "fp32",
    device: str = "cpu",
    tf32: bool = False,
    atol: float | None = None,
    shapes: Sequence[tuple[int, int]] | None = None,
    runtimes: Sequence[str] | None = None,
    quantized: bool = False,
    held_out: torch.Tensor | None = None,
) -> VerificationReport:
    """Run the graph at `path` on every runtime present (or those named in `runtimes`, from RUNTIMES) at
    `shapes` (batch, length; default `default_shapes`) and compare with eager `model` on the same device in
    `dtype` (with `tf32`: CUDA runtimes and eager with TF32 matmuls, judged by the fp16 rule). `twin_path`:
    the graph's verification twin, needed when the model has LSH layers (else their rows fail, saying so).
    `device` is the device the graph was exported on (CUDA exports get a note when no CUDA runtime could
    run them). `quantized`: an int8 graph (exporters.quantize), judged by exporters.task_verdict instead of
    the rows' tolerance and near-tie certificates, which its rows report as information; `held_out`: token
    windows (W, L) for its LM metrics (exporters.models.held_out_windows; None: the verifier's inputs).
    Never raises for a failed comparison: the report carries it."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_device(device)
    unknown = sorted(set(runtimes or ()) - set(RUNTIMES[fmt]))
    if unknown:
        raise ExportError(f"unknown runtime {', '.join(unknown)} for {fmt}: choose from {', '.join(RUNTIMES[fmt])}")
    config = model.config
    shapes = list(shapes) if shapes is not None else default_shapes(config)
    report = VerificationReport(fmt, str(path))
    if twin_path is not None:
        extra, missing = twin_node_difference(str(path), str(twin_path), fmt)
        report.twin_extra_nodes, report.twin_missing_nodes = dict(extra), dict(missing)
    for name in runtimes or RUNTIMES[fmt]:
        runner, reason = open_runtime(name, fmt, str(path), tf32)
        if runner is None:
            report.skipped.append(f"{name}: {reason}")
            continue
        twin = None if twin_path is None else open_runtime(name, fmt, str(twin_path), tf32)[0]
        eager = spec.wrap(model_as(model, dtype, runner.device), with_buckets=True)
        samples = [] if quantized else None
        for batch, length in shapes:
            input_ids, attention_mask = verification_inputs(batch, length, config.vocab_size)
            report.rows.append(compare(runner, twin, eager, spec, input_ids, attention_mask, name.split("-")[0], dtype,
                                       tf32, atol, samples))
        if quantized:
            report.task_verdicts.append(judge_quantized(runner, eager, spec, name, samples, held_out))
    if device == "cuda" and not any(row.device == "cuda" for row in report.rows):
        report.skipped.append("cuda: exported for CUDA, but no CUDA runtime could run it here")
    return report


def default_shapes(config, max_length: int | None = None) -> list[tuple[int, int]]:
    """Length 1, one below a chunk, an odd length (not a multiple of the chunk lengths) and the maximum,
    at batch 1 and > 1."""
    max_length = max_length or config.max_position_embeddings
    chunk = min(config.chunk_lengths)
    below_chunk = max(1, chunk - 1)
    odd = config.padding_multiple + config.padding_multiple // 2 + 1
    odd = odd if odd < max_length else max(1, max_length - 1)
    candidates = [(1, 1), (2, below_chunk), (3, odd), (1, odd), (2, max_length)]
    return [(batch, min(length, max_length)) for batch, length in dict.fromkeys(candidates)]


def verification_inputs(batch: int, length: int, vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random ids; row 0 unpadded, row i > 0 keeps its first length - i * length // (batch + 1) tokens (at
    least one)."""
    generator = torch.Generator().manual_seed(seed + 1000 * batch + length)
    input_ids = torch.randint(1, max(2, vocab_size), (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        attention_mask[row, max(1, length - row * length // (batch + 1)):] = 0
    return input_ids, attention_mask


def open_runtime(name: str, fmt: str, path: str, tf32: bool = False) -> tuple[Runner | None, str]:
    """(runner, '') for a runtime present, else (None, why not)."""
    device = name.split("-")[1]
    if fmt == "onnx":
        return open_onnxruntime(path, device, tf32)
    if device == "cuda" and not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    if fmt == "aoti":
        return open_aoti(path, device, tf32)
    from .torchscript import legacy_jit

    try:
        with legacy_jit():
            module = torch.jit.load(path, map_location=device)
    except Exception as error:  # a file torch cannot load is a failed verification, not a crash
        raise ExportError(f"cannot load TorchScript file {path}: {first_line(error)}") from None
    return module_runner(module, device, tf32), ""


def open_aoti(path: str, device: str, tf32: bool = False) -> tuple[Runner | None, str]:
    """An AOTInductor package runs on the device it was compiled for only (exporters/aoti.py)."""
    from .aoti import load_package, package_metadata

    compiled_for = package_metadata(path)["AOTI_DEVICE_KEY"]
    if compiled_for != device:
        return None, f"the package is compiled for {compiled_for}"
    try:
        package = load_package(path)
    except Exception as error:  # a package torch cannot load is a failed verification, not a crash
        raise ExportError(f"cannot load AOTInductor package {path}: {first_line(error)}") from None
    return module_runner(package, device, tf32), ""


def module_runner(module, device: str, tf32: bool) -> Runner:
    """A Runner over a loaded TorchScript module or AOTInductor package (same calling convention)."""

    def run(inputs):
        inputs = [tensor.to(device) for tensor in inputs]
        with torch.no_grad(), tf32_matmuls(tf32):
            # A twin takes its forced buckets as one tuple argument (exporters.specs.ExportWrapper).
            outputs = module(*inputs[:2], tuple(inputs[2:])) if len(inputs) > 2 else module(*inputs)
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        return [tensor.cpu() for tensor in outputs]

    return Runner(run, device)


def open_onnxruntime(path: str, device: str, tf32: bool = False) -> tuple[Runner | None, str]:
    from reformer.runtime import CPU, CUDA, open_session, shrink_arena_run_options

    provider = {"cpu": CPU, "cuda": CUDA}[device]
    if provider not in onnxruntime_providers():
        return None, f"onnxruntime lists no {provider}"
    try:
        # Quiet: a CUDA provider that cannot load is reported in `skipped`, not logged. TF32 as eager's run
        # (open_session's CUDA options: strict fp32 unless tf32).
        session = open_session(path, [provider], quiet=True, tf32=tf32)
    except Exception as error:
        if device == "cuda":  # the provider is listed but cannot start (no GPU, missing CUDA libraries)
            return None, f"{provider} failed to start: {first_line(error)}"
        raise ExportError(f"ONNX Runtime cannot load {path}: {first_line(error)}") from None
    if provider not in session.get_providers():
        return None, f"{provider} is listed but the session fell back to {session.get_providers()}"
    input_names = [graph_input.name for graph_input in session.get_inputs()]
    # Verification keeps a graph's and its twin's sessions open together: their arenas shrink after each run
    # (a long input's CUDA arena is tens of GiB).
    run_options = shrink_arena_run_options(session)

    def run(inputs):
        feeds = {name: tensor.cpu().numpy() for name, tensor in zip(input_names, inputs)}
        return [torch.from_numpy(output) for output in session.run(None, feeds, run_options)]

    return Runner(run, device, [output.name for output in session.get_outputs()]), ""


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """Eager's, TorchScript's and AOTInductor packages' (ATen) CUDA matmuls in TF32 (enabled) or strict fp32, to
    compare like with like; restores the previous setting."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def judge_quantized(runner: Runner, eager, spec: TaskSpec, runtime: str, samples: list[Sample],
                    held_out: torch.Tensor | None) -> TaskVerdict:
    """exporters.task_verdict.judge over the rows' runs (`samples`) and, when given, the held-out windows."""
    if held_out is None:
        return judge(spec.name, spec.output_names, spec.per_position, runtime, samples, samples,
                     "the verifier's random inputs", held_out=False)
    outputs, text_samples = len(spec.output_names), []
    for window in held_out:
        input_ids, attention_mask = window[None], torch.ones(1, held_out.shape[1], dtype=torch.long)
        with torch.no_grad():
            expected = eager(input_ids.to(runner.device), attention_mask.to(runner.device))[:outputs]
        text_samples.append(Sample([tensor.cpu() for tensor in expected],
                                   runner.run([input_ids, attention_mask])[:outputs], input_ids, attention_mask))
    return judge(spec.name, spec.output_names, spec.per_position, runtime, samples + text_samples, text_samples,
                 f"held-out text ({held_out.shape[0]} windows of {held_out.shape[1]} tokens)", held_out=True)


def compare(runner: Runner, twin: Runner | None, eager, spec: TaskSpec, input_ids, attention_mask, runtime: str,
            dtype: str, tf32: bool, atol: float | None, samples: list[Sample] | None = None) -> VerificationRow:
    """One row: eager (recording each LSH layer's input), the shipped graph, and the twin with eager's buckets.
    `samples`: a quantized graph's, collecting each run for its task verdict; its row reports the replayed
    error, the flips and the certificates without judging them (quantization moves more than rounding)."""
    precision = PRECISIONS["tf32" if tf32 else dtype]
    row = VerificationRow(runtime, runner.device, tuple(input_ids.shape), precision.name)
    device = runner.device
    with torch.no_grad(), tf32_matmuls(tf32), recorded_hash_inputs(eager.model) as hash_inputs:
        expected = list(eager(input_ids.to(device), attention_mask.to(device)))
    outputs = len(spec.output_names)
    eager_outputs = [tensor.cpu() for tensor in expected[:outputs]]
    eager_buckets = expected[outputs:]  # on the device, beside the recorded inputs
    keep = attention_mask.bool()
    layers = lsh_layers(eager.model)
    names = spec.all_output_names(len(layers), True)
    shipped = run_checked(runner, [input_ids, attention_mask], names, eager_outputs, row, buckets_optional=True)
    if shipped is None:
        return row
    row.max_abs, scale = output_error(spec, eager_outputs, shipped[:outputs], keep)
    row.max_rel = row.max_abs / scale
    row.tolerance = atol if atol is not None else precision.relative_tolerance * scale
    shipped_buckets = shipped[outputs:]
    if shipped_buckets:
        count_bucket_flips(row, eager_buckets, shipped_buckets, keep)
    if not layers:  # nothing hashed, nothing to replay: the graph's own outputs are judged
        replayed = shipped
    elif twin is None:
        row.note = "no verification twin given: LSH layers cannot be checked apart from their hashing"
        return row
    else:
        forced = [tensor.cpu() for tensor in eager_buckets]
        replayed = run_checked(twin, [input_ids, attention_mask, *forced], names, eager_outputs, row)
        if replayed is None:
            return row
        row.replayed = True
    row.replay_max_abs, _ = output_error(spec, eager_outputs, replayed[:outputs], keep)
    row.replay_max_rel = row.replay_max_abs / scale
    disagreements = [
        disagreement
        for index, (layer, hash_input, want, got) in enumerate(zip(layers, hash_inputs, eager_buckets, replayed[outputs:]))
        for disagreement in certify(layer, index, hash_input, want, got, keep, precision)
    ]
    # The shipped graph's first LSH layer hashes eager's input up to rounding: its buckets are certified where
    # it outputs them; without bucket outputs, the twin's first layer (the same nodes on the same input) was.
    if shipped_buckets and layers:
        disagreements += certify(layers[0], 0, hash_inputs[0], eager_buckets[0], shipped_buckets[0], keep, precision)
    record_certificates(row, disagreements)
    if samples is not None:
        samples.append(Sample(eager_outputs, shipped[:outputs], input_ids, attention_mask))
        mark_as_information(row)
        row.note = "" if row.passed else "runtime output holds NaN"
        return row
    row.passed = (row.replay_max_abs <= row.tolerance and row.certified == row.disagreements
                  and row.max_abs == row.max_abs)  # NaN compares false
    row.note = explain(row)
    return row


def mark_as_information(row: VerificationRow) -> None:
    """A quantized graph's row: its numbers are information (the task verdict judges the graph), and it fails
    only on NaN; it is judged against no tolerance."""
    row.passed = row.max_abs == row.max_abs and row.replay_max_abs == row.replay_max_abs  # NaN compares false
    row.tolerance, row.dtype = float("nan"), "int8"


def run_checked(runner: Runner, inputs: list[torch.Tensor], names: list[str], expected: list[torch.Tensor],
                row: VerificationRow, buckets_optional: bool = False):
    """The runner's outputs, or None with the reason in row.note: a runtime error, output names (or their
    number) that are not the spec's, or a shape that is not eager's (`expected`; values are the caller's).
    `names`: the task outputs then the bucket outputs, which a deployment graph may leave out
    (`buckets_optional`)."""
    try:
        outputs = runner.run(inputs)
    except Exception as error:  # a runtime that cannot run a shape fails that row, with its reason
        row.note = f"runtime error: {first_line(error)}"
        return None
    if buckets_optional and len(outputs) == len(expected):
        names = names[:len(expected)]
    if runner.output_names is not None and runner.output_names != names:
        row.note = f"the graph's outputs are {runner.output_names}, the spec's {names}"
        return None
    if len(outputs) != len(names):
        row.note = f"the graph returns {len(outputs)} outputs, the spec names {len(names)}"
        return None
    row.note = shape_mismatch(names, expected, outputs)
    return None if row.note else outputs


def shape_mismatch(names, expected, actual) -> str:
    """'' when every tensor has eager's shape, else the first that does not."""
    for name, want, got in zip(names, expected, actual):
        if got.shape != want.shape:
            return f"{name} has shape {tuple(got.shape)}, eager {tuple(want.shape)}"
    return ""


def output_error(spec: TaskSpec, expected, actual, keep) -> tuple[float, float]:
    """Max abs error over every output (NaN if any runtime value is NaN where eager's is not) and the output scale: the largest eager magnitude, at least 1, both at the positions `keep`
    (B, L) selects in per-position outputs."""
    max_abs, scale = 0.0, 1.0
    for name, want, got in zip(spec.output_names, expected, actual):
        want, got = want.double(), got.double()
        if spec.per_position(name):
            want, got = want[keep], got[keep]
        if want.numel():
            error = (want - got).abs().max().item()
            max_abs = error if error != error else max(max_abs, error)  # NaN stays NaN
            scale = max(scale, want.abs().max().item())
    return max_abs, scale


def count_bucket_flips(row: VerificationRow, expected, actual, keep) -> None:
    """Bucket assignments (B, H, N, L per LSH layer) that differ from eager at kept positions."""
    flips = []
    for want, got in zip(expected, actual):
        want = want.cpu()
        kept = keep[:, None, None, :].expand_as(want)
        flips.append((int((got != want)[kept].sum()), int(kept.sum())))
    row.first_layer_flipped, row.first_layer_total = flips[0]
    row.flipped_buckets = sum(flipped for flipped, _ in flips)
    row.total_buckets = sum(total for _, total in flips)


def record_certificates(row: VerificationRow, disagreements: list[Disagreement]) -> None:
    row.disagreements = len(disagreements)
    row.certified = sum(disagreement.certified for disagreement in disagreements)
    if disagreements:
        worst = max(disagreements, key=lambda disagreement: disagreement.ratio)
        row.worst_margin, row.worst_bound, row.worst_disagreement = worst.margin, worst.bound, worst.describe()


def explain(row: VerificationRow) -> str:
    """Why a row failed (every reason), or why a row with flips passed."""
    if row.max_abs != row.max_abs or row.replay_max_abs != row.replay_max_abs:
        return "runtime output holds NaN"
    problems = []
    what = "replayed outputs" if row.replayed else "outputs"
    if row.replay_max_abs > row.tolerance:
        problems.append(f"{what} differ by {row.replay_max_abs:.3g} > tolerance {row.tolerance:.2g}"
                        + (" with eager's buckets in every LSH layer: the graph computes something else"
                           if row.replayed else ""))
    if row.certified < row.disagreements:
        problems.append(f"{row.disagreements - row.certified} of {row.disagreements} bucket disagreements are not "
                        f"near-ties, the graph hashes differently; worst: {row.worst_disagreement}")
    if problems:
        return "; ".join(problems)
    if row.flipped_buckets:
        return (f"free-running: {row.flipped_buckets} of {row.total_buckets} bucket assignments flipped "
                f"({row.first_layer_flipped} in the first LSH layer), max abs {row.max_abs:.3g}; every disagreement "
                f"with eager is a certified near-tie and the replayed outputs match")
    if row.disagreements:
        return (f"{row.disagreements} bucket disagreements with eager, every one a certified near-tie; free-running "
                f"max abs {row.max_abs:.3g}, the replayed outputs match")
    return ""


def verify_decoder(model, folder: str, fmt: str, steps: int | None = None, atol: float | None = None,
                   quantized: bool = False, held_out: torch.Tensor | None = None) -> VerificationReport:
    """The prefill and decoder-step graphs in `folder` (exporters.decoder) against eager
    `reformer.generation.IncrementalDecoder`, fp32 on the CPU, with the task graphs' protocol: output names,
    then shapes, then values, one row per prompt (batch, length): 3 one-token prompts (the LSH layers'
    full-attention start) and 1 prompt longer than the traced one, each followed by greedy steps (eager's
    tokens for both).

    Replay: every step gets eager's cache as its past, so the runtime's own hashing of earlier positions
    cannot compound; the prefill and every step's logits are judged (fp32 rule). The prefill's bucket
    outputs are compared with eager's, and its first-LSH-layer disagreements must be certified near-ties;
    the free-running decode (the runtime's own cache fed back) is reported as information.

    `quantized` graphs (exporters.quantize): the rows are information, and the task verdict
    (exporters.task_verdict, causal-lm) judges the prefill's and the replayed steps' logits, with bits per token
    and top-1 agreement measured by the prefill graph on `held_out` windows where given."""
    from .decoder import load_graphs
    from reformer.generation import IncrementalDecoder, cache_names

    config = model.config
    run = load_graphs(folder, fmt)
    decoder = IncrementalDecoder(model)
    layers = lsh_layers(model)
    names = cache_names(config)
    bucket_slots = [index for index, name in enumerate(names) if name.startswith("buckets_")]
    steps = steps or config.lsh_attn_chunk_length + 3
    from reformer.runtime import DECODER_CONFIG_NAME

    with open(os.path.join(folder, DECODER_CONFIG_NAME), encoding="utf-8") as handle:
        max_length = json.load(handle)["max_length"]  # the longest sequence the graphs serve
    traced_length = example_length(config.padding_multiple, max_length - 1)  # exporters.decoder.example_prompt's
    runtime = "onnxruntime" if fmt == "onnx" else fmt
    report = VerificationReport(fmt, folder)
    samples = []
    for batch, length in [(3, 1), (1, min(traced_length + 2, max_length - 1))]:
        row = VerificationRow(runtime, "cpu", (batch, length), "fp32", replayed=True)
        report.rows.append(row)
        tokens = torch.randint(1, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))
        try:
            with torch.no_grad(), recorded_hash_inputs(model) as hash_inputs:
                expected, cache = decoder.prefill(tokens)
            logits, present = run("prefill", tokens, [])
            prefill_expected, prefill_logits = expected, logits
        except Exception as error:  # a runtime that cannot run a prompt fails that row, with its reason
            row.note = f"runtime error: {first_line(error)}"
            continue
        mismatch = decoder_mismatch(logits, present, expected, cache.tensors(), names)
        if mismatch:
            row.note = mismatch
            continue
        scale = max(1.0, expected.abs().max().item())
        replay_error = (logits - expected).abs().max().item()
        free_error, free_present = replay_error, present
        keep = torch.ones(batch, length, dtype=torch.bool)
        eager_buckets = [cache.tensors()[slot] for slot in bucket_slots]
        runtime_buckets = [present[slot] for slot in bucket_slots]
        if eager_buckets:
            count_bucket_flips(row, eager_buckets, runtime_buckets, keep)
            record_certificates(row, certify(layers[0], 0, hash_inputs[0], eager_buckets[0], runtime_buckets[0], keep,
                                             PRECISIONS["fp32"]))
        for _ in range(min(steps, max_length - length)):
            next_tokens = expected[:, -1:].argmax(-1)
            with torch.no_grad():
                expected, cache_after = decoder.step(next_tokens, cache)
            logits, _ = run("step", next_tokens, list(cache.tensors()))
            samples.append(Sample([expected], [logits], next_tokens, torch.ones_like(next_tokens)))
            free_logits, free_present = run("step", next_tokens, free_present)
            replay_error = max(replay_error, (logits - expected).abs().max().item())
            free_error = max(free_error, (free_logits - expected).abs().max().item())
            scale = max(scale, expected.abs().max().item())
            cache = cache_after
        row.replay_max_abs, row.max_abs = replay_error, free_error
        row.replay_max_rel, row.max_rel = replay_error / scale, free_error / scale
        row.tolerance = atol if atol is not None else PRECISIONS["fp32"].relative_tolerance * scale
        row.passed = row.replay_max_abs <= row.tolerance and row.certified == row.disagreements
        row.note = explain(row) or f"prefill and {steps} greedy steps"
        if quantized:
            mark_as_information(row)
            row.note = f"prefill and {steps} greedy steps" if row.passed else "runtime output holds NaN"
            samples.append(Sample([prefill_expected], [prefill_logits], tokens, torch.ones_like(tokens)))
    if quantized:
        report.task_verdicts.append(judge_decoder(decoder, run, runtime, samples, held_out))
    return report


def judge_decoder(decoder, run, runtime: str, samples: list[Sample], held_out: torch.Tensor | None) -> TaskVerdict:
    """exporters.task_verdict.judge of quantized decoder graphs: `samples` (each prefill and replayed step) and
    the prefill graph on the held-out windows, which give the LM metrics where the model ships them."""
    text, lm_samples = "the verifier's prompts", [sample for sample in samples if sample.input_ids.shape[1] > 1]
    if held_out is not None:
        text = f"held-out text ({held_out.shape[0]} windows of {held_out.shape[1]} tokens)"
        lm_samples = []
        for window in held_out:
            with torch.no_grad():
                expected, _ = decoder.prefill(window[None])
            logits, _ = run("prefill", window[None], [])
            lm_samples.append(Sample([expected], [logits], window[None], torch.ones_like(window[None])))
        samples = samples + lm_samples
    return judge("causal-lm", ("logits",), lambda name: True, runtime, samples, lm_samples, text,
                 held_out=held_out is not None)


def decoder_mismatch(logits, present, expected, expected_cache, names) -> str:
    """'' when the graph's logits and cache have eager's count and shapes, else what differs."""
    if len(present) != len(expected_cache):
        return f"the graph returns {len(present)} cache tensors, eager {len(expected_cache)}"
    return shape_mismatch(["logits", *names], [expected, *expected_cache], [logits, *present])


def twin_node_difference(path: str, twin_path: str, fmt: str) -> tuple[collections.Counter, collections.Counter]:
    """(node kinds only the twin has, node kinds only the shipped graph has), with their counts."""
    shipped, twin = node_kinds(path, fmt), node_kinds(twin_path, fmt)
    return twin - shipped, shipped - twin


def node_kinds(path: str, fmt: str) -> collections.Counter:
    if fmt == "onnx":
        import onnx

        model = onnx.load(path, load_external_data=False)
        return collections.Counter(node.op_type for node in model.graph.node)
    if fmt == "aoti":  # the compiled package holds no graph; its description counts the exported program's ops
        from .aoti import load_metadata

        return collections.Counter(load_metadata(path)["program_ops"])
    from .torchscript import legacy_jit, node_kinds as torchscript_node_kinds

    with legacy_jit():
        return collections.Counter(torchscript_node_kinds(torch.jit.load(path, map_location="cpu")))
