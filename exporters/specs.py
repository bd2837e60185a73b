"""One export spec per task: what the graph takes, what it returns, which axes are dynamic, how close it
must stay to eager. Exporters and the verifier read only this."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

INPUT_NAMES = ("input_ids", "attention_mask")
DYNAMIC_AXES = {0: "batch_size", 1: "sequence_length"}
BUCKETS_OUTPUT_PREFIX = "buckets_"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    model_class: str
    output_names: tuple[str, ...]
    # Tolerance against eager in fp32 (max abs): eager and runtime run the same ops in the same order,
    # so only kernel-level rounding separates them.
    atol: float = 1e-5

    def wrap(self, model: nn.Module, with_buckets: bool = False) -> "ExportWrapper":
        return ExportWrapper(model, self.output_names, with_buckets)

    def dynamic_axes(self, lsh_layers: int = 0, with_buckets: bool = False) -> dict[str, dict[int, str]]:
        """ONNX-style dynamic axes of every input and output."""
        axes = {name: dict(DYNAMIC_AXES) for name in INPUT_NAMES}
        for name in self.output_names:
            axes[name] = {0: "batch_size"} if name == "logits" and self.name == "sequence-classification" else dict(
                DYNAMIC_AXES)
        if with_buckets:
            for index in range(lsh_layers):
                axes[f"{BUCKETS_OUTPUT_PREFIX}{index}"] = {0: "batch_size", 3: "sequence_length"}
        return axes

    def all_output_names(self, lsh_layers: int = 0, with_buckets: bool = False) -> list[str]:
        names = list(self.output_names)
        if with_buckets:
            names += [f"{BUCKETS_OUTPUT_PREFIX}{index}" for index in range(lsh_layers)]
        return names


class ExportWrapper(nn.Module):
    """forward(input_ids, attention_mask) -> tuple of tensors in the spec's output order, then (optionally)
    the buckets of each LSH layer, B, H, N, L int64, for checking bucket agreement across runtimes."""

    def __init__(self, model: nn.Module, output_names: tuple[str, ...], with_buckets: bool):
        super().__init__()
        self.model = model
        self.output_names = output_names
        self.with_buckets = with_buckets

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        tensors = tuple(getattr(output, name) for name in self.output_names)
        return tensors + tuple(output.buckets) if self.with_buckets else tensors


TASKS = {
    spec.name: spec
    for spec in (
        TaskSpec("base", "ReformerModel", ("last_hidden_state",)),
        TaskSpec("causal-lm", "ReformerModelWithLMHead", ("logits",)),
        TaskSpec("masked-lm", "ReformerForMaskedLM", ("logits",)),
        TaskSpec("sequence-classification", "ReformerForSequenceClassification", ("logits",)),
        TaskSpec("question-answering", "ReformerForQuestionAnswering", ("start_logits", "end_logits")),
    )
}
MODEL_CLASS_TO_TASK = {spec.model_class: spec.name for spec in TASKS.values()}
