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
defined, see tests/reformer/test_parity.py); max rel = max abs / the output scale.

The pieces: graphs load as runners (exporters.runners), rows and reports with typed failures
(exporters.verification_report, exporters.verification_failures), the comparison steps this module and the
decoder's verification (exporters.decoder_verification) share (exporters.comparison), and the twin's node
difference (exporters.twin_difference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .comparison import (
    agreement_note,
    count_bucket_flips,
    judged_failures,
    mark_as_information,
    output_error,
    record_certificates,
    run_checked,
)
from .errors import ExportError
from .formats import GRAPH_FORMATS
from .near_ties import PRECISIONS, Disagreement, Precision, certify, lsh_layers, recorded_hash_inputs
from .precision import check_device, model_as
from .runners import Runner, tf32_matmuls
from .specs import TaskSpec
from .task_verdict import Sample, TaskVerdict, judge
from .twin_difference import twin_node_difference
from .verification_failures import NoTwinFailure
from .verification_report import VerificationReport, VerificationRow


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
    """Run the graph at `path` on every runtime present (or those named in `runtimes`, from its format's
    `runtimes`: exporters.formats) at `shapes` (batch, length; default `default_shapes`) and compare with eager `model` on the same device in
    `dtype` (with `tf32`: CUDA runtimes and eager with TF32 matmuls, judged by the fp16 rule). `twin_path`:
    the graph's verification twin, needed when the model has LSH layers (else their rows fail, saying so).
    `device` is the device the graph was exported on (CUDA exports get a note when no CUDA runtime could
    run them). `quantized`: an int8 graph (exporters.quantize), judged by exporters.task_verdict instead of
    the rows' tolerance and near-tie certificates, which its rows report as information; `held_out`: token
    windows (W, L) for its LM metrics (exporters.models.held_out_windows; None: the verifier's inputs).
    Never raises for a failed comparison: the report carries it."""
    if fmt not in GRAPH_FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(GRAPH_FORMATS)}")
    check_device(device)
    graph_format = GRAPH_FORMATS[fmt]
    unknown = sorted(set(runtimes or ()) - set(graph_format.runtimes))
    if unknown:
        raise ExportError(f"unknown runtime {', '.join(unknown)} for {fmt}: choose from "
                          f"{', '.join(graph_format.runtimes)}")
    config = model.config
    shapes = list(shapes) if shapes is not None else default_shapes(config)
    report = VerificationReport(fmt, str(path))
    if twin_path is not None:
        extra, missing = twin_node_difference(str(path), str(twin_path), fmt)
        report.twin_extra_nodes, report.twin_missing_nodes = dict(extra), dict(missing)
    for name in runtimes or graph_format.runtimes:
        device_of_runtime = name.rsplit("-", 1)[1]
        runner, reason = graph_format.open_runner(str(path), device_of_runtime, tf32)
        if runner is None:
            report.skipped.append(f"{name}: {reason}")
            continue
        twin = None if twin_path is None else graph_format.open_runner(str(twin_path), device_of_runtime, tf32)[0]
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


@dataclass
class EagerRun:
    """Eager's run on one input: its task outputs (CPU), and on its device its buckets and the input it hashed,
    per LSH layer."""

    outputs: list[torch.Tensor]
    buckets: list[torch.Tensor]
    hash_inputs: list[torch.Tensor]


def run_eager(eager, spec: TaskSpec, input_ids, attention_mask, device: str, tf32: bool) -> EagerRun:
    with torch.no_grad(), tf32_matmuls(tf32), recorded_hash_inputs(eager.model) as hash_inputs:
        expected = list(eager(input_ids.to(device), attention_mask.to(device)))
    outputs = len(spec.output_names)
    return EagerRun([tensor.cpu() for tensor in expected[:outputs]], expected[outputs:], hash_inputs)


def compare(runner: Runner, twin: Runner | None, eager, spec: TaskSpec, input_ids, attention_mask, runtime: str,
            dtype: str, tf32: bool, atol: float | None, samples: list[Sample] | None = None) -> VerificationRow:
    """One row: eager (recording each LSH layer's input), the shipped graph, and the twin with eager's buckets.
    `samples`: a quantized graph's, collecting each run for its task verdict; its row reports the replayed
    error, the flips and the certificates without judging them (quantization moves more than rounding)."""
    precision = PRECISIONS["tf32" if tf32 else dtype]
    row = VerificationRow(runtime, runner.device, tuple(input_ids.shape), precision.name)
    expected = run_eager(eager, spec, input_ids, attention_mask, runner.device, tf32)
    keep = attention_mask.bool()
    layers = lsh_layers(eager.model)
    names = spec.all_output_names(len(layers), True)
    shipped = run_checked(runner, [input_ids, attention_mask], names, expected.outputs, row, buckets_optional=True)
    if shipped is None:
        return row
    outputs = len(spec.output_names)
    row.max_abs, scale = output_error(spec, expected.outputs, shipped[:outputs], keep)
    row.max_rel = row.max_abs / scale
    row.tolerance = atol if atol is not None else precision.relative_tolerance * scale
    if shipped[outputs:]:
        count_bucket_flips(row, expected.buckets, shipped[outputs:], keep)
    replayed = replayed_outputs(row, twin, layers, shipped, [input_ids, attention_mask], names, expected)
    if replayed is None:
        return row
    row.replay_max_abs, _ = output_error(spec, expected.outputs, replayed[:outputs], keep)
    row.replay_max_rel = row.replay_max_abs / scale
    record_certificates(row, bucket_disagreements(layers, expected, replayed[outputs:], shipped[outputs:], keep,
                                                  precision))
    if samples is not None:
        samples.append(Sample(expected.outputs, shipped[:outputs], input_ids, attention_mask))
        mark_as_information(row)
    else:
        row.conclude(judged_failures(row), agreement_note(row))
    return row


def replayed_outputs(row: VerificationRow, twin: Runner | None, layers: list, shipped: list, inputs: list,
                     names: list[str], expected: EagerRun) -> list | None:
    """The outputs the row judges: the twin's with eager's buckets forced in every LSH layer (the row is then
    `replayed`), the shipped graph's own when nothing is hashed, or None with the row failed (no twin, or a
    twin that did not run as the spec says)."""
    if not layers:  # nothing hashed, nothing to replay
        return shipped
    if twin is None:
        row.conclude([NoTwinFailure(len(layers))])
        return None
    forced = [tensor.cpu() for tensor in expected.buckets]
    replayed = run_checked(twin, [*inputs, *forced], names, expected.outputs, row)
    row.replayed = replayed is not None
    return replayed


def bucket_disagreements(layers: list, expected: EagerRun, replayed_buckets: list, shipped_buckets: list, keep,
                         precision: Precision) -> list[Disagreement]:
    """Every bucket the replay's hashing chose differently from eager's, in every LSH layer, with its
    certificate; and those of the shipped graph's first LSH layer, which hashes eager's input up to rounding,
    where the graph outputs its buckets (without them, the twin's first layer, the same nodes on the same
    input, stands for it)."""
    disagreements = [
        disagreement
        for index, (layer, hash_input, want, got) in enumerate(
            zip(layers, expected.hash_inputs, expected.buckets, replayed_buckets))
        for disagreement in certify(layer, index, hash_input, want, got, keep, precision)
    ]
    if shipped_buckets and layers:
        disagreements += certify(layers[0], 0, expected.hash_inputs[0], expected.buckets[0], shipped_buckets[0], keep,
                                 precision)
    return disagreements
