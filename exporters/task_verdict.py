"""The verdict on a quantized graph: does it still do the model's task as eager does?

An int8 graph cannot match eager to rounding (each product's weights move by up to half a quantization step,
max|w| / 254), so exporters/verify.py's exact rules cannot judge it. This verdict judges what a user of the
task sees, with bounds a correct int8 graph meets with a wide margin:

- every head: the relative error of each output, ||graph - eager|| / ||eager|| over the positions the mask
  keeps, at most RELATIVE_ERROR_BOUND;
- LM heads (causal-lm, masked-lm): bits per token (the negative log2 probability of each observed token,
  predicted from the position before it in a causal LM, at its own position in a masked LM) within
  BITS_PER_TOKEN_BOUND of eager's; on the model's held-out text, where it ships one
  (exporters.models.ResolvedModel.held_out_windows), top-1 agreement with eager at least TOP1_AGREEMENT_BOUND
  at the positions where eager has decided: its choice at least TOP1_DECIDED_MARGIN more log-probability than
  its runner-up (1.105 times as likely). Where eager's two best are closer, int8's error may swap them, and
  bits per token, which is judged everywhere, is what the swap costs: it moves little, since the two are
  near-equally likely. Agreement at every position is reported as information;
- every choice (LM top-1, the class, QA start and end): no change where eager's margin between its choice and
  the graph's is decided, wider than twice the relative error bound times the row's largest magnitude. A
  random model's logits are near-ties everywhere: there a changed choice says nothing, so the verifier's random
  inputs judge decided choices only, and top-1 agreement on them is information.

Measured with onnxruntime 1.32 on this project's CPU (tests/exporters/test_quantize.py makes these exports;
byte-lm's 8 held-out windows, 8,184 predictions), agreement where eager decided / everywhere:
- correct graphs: models/byte-lm by the recipe its held-out text chose (exporters.quantize: the first layer
  fp32), logits 1.6% off (0.86% on the held-out text alone), bits per token +0.0011 (2.4021 in fp32), top-1
  99.90% / 98.85%; with every product int8, 1.4% off, +0.0040, 99.33% / 97.37%, where with eager's buckets forced
  (exporters.verify's twin) 98.13% agreed everywhere: the rest were buckets the quantized hashing input chose
  differently. 6.5% of byte-lm's predictions are undecided. The model before it (3.45 bits per byte, fewer
  near-ties), every product int8: 0.47% off, +0.0003 bits, 99.97% / 99.33%. The benchmarks' random `small` model
  at 4,096 tokens 2.1% off; tiny random test models 0.02-1.1% off.
- planted defects in byte-lm (first layer fp32, so in the second layer's first feed-forward product): its scale
  doubled, 10.5% off, +0.0072 bits, 98.18% / 95.96%, and one decided choice changed; two rows of its weight
  swapped, 1.9% off, +0.0010 bits, 99.82% / 98.70%: harmless to the task, and it passes (so do two rows swapped
  in the output head or in that layer's second feed-forward product); two rows swapped in every quantized
  weight, a systematic bug, 12.5% off, +0.0835 bits, 89.3% / 86.4%, 45 decided choices changed. With every product
  int8 (the first layer's product) the doubled scale gave 10.5% off, +0.060 bits, 89.7% / 86.8%, the swapped
  rows 4.3% off, +0.029 bits, 94.5% / 92.2%. The relative-error bound is for heads without held-out text, where
  a random model's layers barely move the output (a doubled feed-forward scale moved a tiny model's logits by
  1.08% against 1.06%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

RELATIVE_ERROR_BOUND = 0.08
BITS_PER_TOKEN_BOUND = 0.02
TOP1_AGREEMENT_BOUND = 0.985
TOP1_DECIDED_MARGIN = 0.1  # nats: eager's choice at least e^0.1 = 1.105 times as likely as its runner-up
LM_TASKS = ("causal-lm", "masked-lm")


@dataclass
class Sample:
    """One run of eager and the graph: the task outputs of each (spec order), the ids and the mask."""

    eager: list[torch.Tensor]
    graph: list[torch.Tensor]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class TaskVerdict:
    runtime: str
    text: str  # what the LM metrics were measured on
    held_out: bool  # whether that is held-out text (top-1 agreement is judged on it)
    relative_error: dict[str, float] = field(default_factory=dict)  # per output
    bits_per_token_eager: float | None = None
    bits_per_token_graph: float | None = None
    tokens: int = 0  # how many tokens the LM metrics count
    top1_agreement: float | None = None  # every position (information)
    decided_top1_agreement: float | None = None  # where eager decided (TOP1_DECIDED_MARGIN; judged on held-out text)
    argmax_agreement: dict[str, float] = field(default_factory=dict)  # classification, QA start and end
    decided_changes: int = 0  # choices (top-1, argmax) that changed though eager's margin was wide (judge)
    passed: bool = False
    note: str = ""

    @property
    def bits_per_token_change(self) -> float | None:
        if self.bits_per_token_eager is None:
            return None
        return self.bits_per_token_graph - self.bits_per_token_eager

    def summary(self) -> str:
        parts = [f"relative error {', '.join(f'{name} {error:.2%}' for name, error in self.relative_error.items())} "
                 f"(bound {RELATIVE_ERROR_BOUND:.0%})"]
        if self.bits_per_token_eager is not None:
            bound = f", bound {TOP1_AGREEMENT_BOUND:.1%}" if self.held_out else ""
            parts.append(f"bits per token {self.bits_per_token_graph:.4f} against eager's {self.bits_per_token_eager:.4f} "
                         f"({self.bits_per_token_change:+.4f}, bound {BITS_PER_TOKEN_BOUND}), top-1 agreement "
                         f"{self.decided_top1_agreement:.2%} where eager decided (margin {TOP1_DECIDED_MARGIN}{bound}) "
                         f"and {self.top1_agreement:.2%} everywhere, over {self.tokens} tokens of {self.text}")
        parts += [f"{name} argmax agreement {agreement:.2%}" for name, agreement in self.argmax_agreement.items()]
        parts.append(f"{self.decided_changes} changed choices where eager's margin was decided (bound 0)")
        return f"{self.runtime} task verdict: {'pass' if self.passed else 'FAIL'}: " + "; ".join(parts) + (
            f": {self.note}" if self.note else "")


def judge(task: str, output_names, per_position, runtime: str, samples: list[Sample], lm_samples: list[Sample],
          text: str, held_out: bool) -> TaskVerdict:
    """The verdict over `samples` (the verifier's shapes and any held-out text), with the LM metrics over
    `lm_samples`, described by `text`: the held-out text where the model ships one (`held_out`), else the
    verifier's inputs. per_position(name): whether an output has one value per position (compared where the
    mask keeps it)."""
    verdict = TaskVerdict(runtime, text, held_out)
    failures = []
    for index, name in enumerate(output_names):
        pairs = [kept(sample.eager[index], sample.graph[index], sample.attention_mask, per_position(name))
                 for sample in samples]
        error = math.sqrt(sum(((got - want) ** 2).sum().item() for want, got in pairs))
        size = math.sqrt(sum((want ** 2).sum().item() for want, _ in pairs))
        verdict.relative_error[name] = error / size if size else error
        if not verdict.relative_error[name] <= RELATIVE_ERROR_BOUND:  # NaN fails
            failures.append(f"{name} differs from eager's by {verdict.relative_error[name]:.1%}")
    choices = []  # (what, eager's scores, the graph's scores), one row per choice
    if task in LM_TASKS:
        eager_bits, graph_bits, tokens = 0.0, 0.0, 0
        for sample in lm_samples:
            eager_logits, graph_logits, targets = lm_positions(task, sample)
            eager_bits += bits(eager_logits, targets)
            graph_bits += bits(graph_logits, targets)
            tokens += len(targets)
            choices.append(("top-1", eager_logits, graph_logits))
        verdict.tokens = tokens
        verdict.bits_per_token_eager, verdict.bits_per_token_graph = eager_bits / tokens, graph_bits / tokens
        if not abs(verdict.bits_per_token_change) <= BITS_PER_TOKEN_BOUND:
            failures.append(f"bits per token moved by {verdict.bits_per_token_change:+.4f}")
    elif task == "sequence-classification":
        choices = [("logits", sample.eager[0].double(), sample.graph[0].double()) for sample in samples]
    elif task == "question-answering":
        choices = [(name, *masked_positions(sample.eager[index], sample.graph[index], sample.attention_mask))
                   for index, name in enumerate(output_names) for sample in samples]
    for what in dict.fromkeys(what for what, _, _ in choices):
        rows = [(want, got) for name, want, got in choices if name == what]
        agreement, decided_changes = compare_choices(rows)
        if what == "top-1":
            verdict.top1_agreement, verdict.decided_top1_agreement = agreement, decided_agreement(rows)
            if held_out and verdict.decided_top1_agreement < TOP1_AGREEMENT_BOUND:
                failures.append(f"top-1 agreement {verdict.decided_top1_agreement:.2%} where eager decided")
        else:
            verdict.argmax_agreement[what] = agreement
        verdict.decided_changes += decided_changes
        if decided_changes:
            failures.append(f"{decided_changes} {what} choices differ from eager's where eager's margin exceeds "
                            "what the error bound could move")
    verdict.passed = not failures
    verdict.note = "; ".join(failures)
    return verdict


def compare_choices(rows) -> tuple[float, int]:
    """(agreement, decided changes) of the argmax of each row of scores, eager's (want) against the graph's
    (got): a change is decided where eager's margin between its choice and the graph's exceeds twice
    RELATIVE_ERROR_BOUND times the row's largest eager magnitude, which a graph within the bound would not
    move (a near-tie of a random model's logits may change; a decided choice may not)."""
    same = total = decided = 0
    for want, got in rows:
        want_choice, got_choice = want.argmax(-1), got.argmax(-1)
        changed = want_choice != got_choice
        margin = want.gather(-1, want_choice[..., None]) - want.gather(-1, got_choice[..., None])
        finite = want.masked_fill(~torch.isfinite(want), 0)
        reach = 2 * RELATIVE_ERROR_BOUND * finite.abs().amax(-1, keepdim=True)
        decided += int((changed & (margin > reach)[..., 0]).sum())
        same += int((~changed).sum())
        total += changed.numel()
    return same / total, decided


def decided_agreement(rows) -> float:
    """Top-1 agreement of eager's (want) and the graph's (got) rows of logits at the positions where eager's
    choice leads its runner-up by at least TOP1_DECIDED_MARGIN (a difference of logits is one of
    log-probabilities); 1 where there is no such position."""
    same = total = 0
    for want, got in rows:
        best, runner_up = want.topk(2, dim=-1).values.unbind(-1)
        decided = best - runner_up >= TOP1_DECIDED_MARGIN
        same += int((want.argmax(-1) == got.argmax(-1))[decided].sum())
        total += int(decided.sum())
    return same / total if total else 1.0


def kept(want: torch.Tensor, got: torch.Tensor, attention_mask: torch.Tensor, per_position: bool):
    want, got = want.double(), got.double()
    if per_position:
        keep = attention_mask.bool()
        return want[keep], got[keep]
    return want, got


def lm_positions(task: str, sample: Sample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(eager logits, graph logits, observed tokens) at every kept position that predicts a kept token."""
    eager, graph = sample.eager[0].double(), sample.graph[0].double()
    ids, keep = sample.input_ids, sample.attention_mask.bool()
    if task == "causal-lm":
        eager, graph, ids, keep = eager[:, :-1], graph[:, :-1], ids[:, 1:], keep[:, 1:] & keep[:, :-1]
    return eager[keep], graph[keep], ids[keep]


def bits(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Total negative log2 probability of `targets` (N) under `logits` (N, V)."""
    return -torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum().item() / math.log(2)


def masked_positions(want: torch.Tensor, got: torch.Tensor, attention_mask: torch.Tensor):
    """Per-position logits (B, L) with the positions the mask drops at -inf, for eager and the graph."""
    masked = lambda logits: logits.double().masked_fill(~attention_mask.bool(), -math.inf)  # noqa: E731
    return masked(want), masked(got)
