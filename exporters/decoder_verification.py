"""Verification of the prefill and decoder-step graphs of causal-lm-with-past (exporters.decoder) against eager
`reformer.generation.IncrementalDecoder`, fp32 on the CPU, with the task graphs' protocol and report
(exporters.verify): output names, then shapes, then values, one row per prompt (batch, length): 3 one-token
prompts (the LSH layers' full-attention start) and 1 prompt longer than the traced one, each followed by greedy
steps (eager's tokens for both).

Replay: every step gets eager's cache as its past, so the runtime's own hashing of earlier positions cannot
compound; the prefill and every step's logits are judged (fp32 rule). The prefill's bucket outputs are compared
with eager's, and its first-LSH-layer disagreements must be certified near-ties; the free-running decode (the
runtime's own cache fed back) is reported as information, except that NaN fails, as in the task graphs' rows.

Quantized graphs (exporters.quantize): the rows are information, and the task verdict (exporters.task_verdict,
causal-lm) judges the prefill's and the replayed steps' logits."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from reformer.generation import DecoderCache, IncrementalDecoder, cache_names
from reformer.sampling import DECODER_CONFIG_NAME

from .comparison import (
    agreement_note,
    count_bucket_flips,
    judged_failures,
    mark_as_information,
    record_certificates,
    shape_mismatch,
)
from .decoder_graphs import example_prompt_length
from .errors import first_line
from .formats import GRAPH_FORMATS
from .near_ties import PRECISIONS, certify, lsh_layers, recorded_hash_inputs
from .task_verdict import Sample, TaskVerdict, judge
from .verification_failures import CountFailure, RuntimeFailure, VerificationFailure
from .verification_report import VerificationReport, VerificationRow


@dataclass
class Prefill:
    """A prompt's prefill by eager and by the graph, which agree in output count and shapes."""

    tokens: torch.Tensor
    expected: torch.Tensor  # eager's logits
    cache: DecoderCache  # eager's
    logits: torch.Tensor  # the graph's
    present: list[torch.Tensor]  # the graph's cache


def load_graphs(folder: str, fmt: str):
    """run(kind, input_ids, past) -> (logits, present) over the graphs in folder, torch tensors in and out (CPU)."""
    graphs = GRAPH_FORMATS[fmt].decoder_runners(folder)

    def run(kind, input_ids, past):
        logits, *present = graphs[kind].run([input_ids, *past])
        return logits, present
    return run


def verify_decoder(model, folder: str, fmt: str, steps: int | None = None, atol: float | None = None,
                   quantized: bool = False, held_out: torch.Tensor | None = None) -> VerificationReport:
    """The graphs in `folder` (written by exporters.decoder) against eager `model`, as the module docstring
    says: up to `steps` greedy steps per prompt (default the LSH chunk length + 3, fewer where max_length ends
    them first), `atol` instead of the fp32 rule's tolerance. `quantized`: bits per token and top-1 agreement
    measured by the prefill graph on `held_out` windows where given (else on the verifier's prompts)."""
    run = load_graphs(folder, fmt)
    decoder = IncrementalDecoder(model)
    max_length = served_length(folder)
    steps = steps or model.config.lsh_attn_chunk_length + 3
    runtime = GRAPH_FORMATS[fmt].runtime
    report = VerificationReport(fmt, folder)
    samples = []
    for tokens in verification_prompts(model.config, max_length):
        row = VerificationRow(runtime, "cpu", tuple(tokens.shape), "fp32", replayed=True)
        report.rows.append(row)
        prefill = checked_prefill(decoder, run, tokens, row)
        if prefill is not None:
            verify_steps(decoder, run, prefill, min(steps, max_length - tokens.shape[1]), row, atol, quantized,
                         samples)
    if quantized:
        report.task_verdicts.append(judge_decoder(decoder, run, runtime, samples, held_out))
    return report


def served_length(folder: str) -> int:
    """max_length in the folder's decoder_config.json: the longest sequence the graphs serve."""
    with open(os.path.join(folder, DECODER_CONFIG_NAME), encoding="utf-8") as handle:
        return json.load(handle)["max_length"]


def verification_prompts(config, max_length: int) -> list[torch.Tensor]:
    """3 one-token prompts and 1 prompt 2 longer than the traced one (exporters.decoder_graphs.example_prompt's),
    leaving room for a step."""
    traced_length = example_prompt_length(config, max_length)
    shapes = [(3, 1), (1, min(traced_length + 2, max_length - 1))]
    return [torch.randint(1, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))
            for batch, length in shapes]


def checked_prefill(decoder: IncrementalDecoder, run, tokens: torch.Tensor, row: VerificationRow) -> Prefill | None:
    """The prompt's prefill by eager and by the graph, its buckets counted and certified on the row; None with
    the row failed when the graph cannot run it or returns other tensors than eager."""
    try:
        with torch.no_grad(), recorded_hash_inputs(decoder.model) as hash_inputs:
            expected, cache = decoder.prefill(tokens)
        logits, present = run("prefill", tokens, [])
    except Exception as error:  # a runtime that cannot run a prompt fails that row, with its reason
        row.conclude([RuntimeFailure(first_line(error))])
        return None
    failure = decoder_mismatch(logits, present, expected, cache.tensors(), cache_names(decoder.config))
    if failure is not None:
        row.conclude([failure])
        return None
    prefill = Prefill(tokens, expected, cache, logits, present)
    certify_prefill(row, decoder, prefill, hash_inputs)
    return prefill


def certify_prefill(row: VerificationRow, decoder: IncrementalDecoder, prefill: Prefill, hash_inputs) -> None:
    """The graph's bucket outputs against eager's: flips in every LSH layer, certificates in the first."""
    bucket_slots = [index for index, name in enumerate(cache_names(decoder.config)) if name.startswith("buckets_")]
    eager_buckets = [prefill.cache.tensors()[slot] for slot in bucket_slots]
    runtime_buckets = [prefill.present[slot] for slot in bucket_slots]
    if not eager_buckets:
        return
    keep = torch.ones(prefill.tokens.shape, dtype=torch.bool)
    count_bucket_flips(row, eager_buckets, runtime_buckets, keep)
    record_certificates(row, certify(lsh_layers(decoder.model)[0], 0, hash_inputs[0], eager_buckets[0],
                                     runtime_buckets[0], keep, PRECISIONS["fp32"]))


def verify_steps(decoder: IncrementalDecoder, run, prefill: Prefill, steps: int, row: VerificationRow,
                 atol: float | None, quantized: bool, samples: list[Sample]) -> None:
    """`steps` greedy steps after the prefill, then the row's numbers and verdict (information only for
    `quantized` graphs, whose prefill joins `samples` after its replayed steps)."""
    replay_error, free_error, scale = decode_steps(decoder, run, prefill, steps, samples)
    row.replay_max_abs, row.max_abs = replay_error, free_error
    row.replay_max_rel, row.max_rel = replay_error / scale, free_error / scale
    row.tolerance = atol if atol is not None else PRECISIONS["fp32"].relative_tolerance * scale
    information = f"prefill and {steps} greedy steps"
    if quantized:
        mark_as_information(row, information)
        samples.append(Sample([prefill.expected], [prefill.logits], prefill.tokens, torch.ones_like(prefill.tokens)))
    else:
        row.conclude(judged_failures(row), agreement_note(row) or information)


def decode_steps(decoder: IncrementalDecoder, run, prefill: Prefill, steps: int,
                 samples: list[Sample]) -> tuple[float, float, float]:
    """(replayed max abs, free-running max abs, output scale) over the prefill and `steps` greedy steps on
    eager's tokens: replayed, each step gets eager's cache as its past; free-running, the graph's own. Each
    replayed step joins `samples`."""
    expected, cache, free_present = prefill.expected, prefill.cache, prefill.present
    replay_error = free_error = (prefill.logits - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    for _ in range(steps):
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
    return replay_error, free_error, scale


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


def decoder_mismatch(logits, present, expected, expected_cache, names) -> VerificationFailure | None:
    """None when the graph's logits and cache have eager's count and shapes, else what differs."""
    if len(present) != len(expected_cache):
        return CountFailure(len(present), len(expected_cache), "cache tensors", "eager")
    return shape_mismatch(["logits", *names], [expected, *expected_cache], [logits, *present])
