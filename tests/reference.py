"""The `transformers` reference as a test oracle: build a random reference model for a case, save it with
`save_pretrained`, and load the same weights into our class."""

from __future__ import annotations

import pytest
import torch

import reformer
from tiny_configs import Case

transformers = pytest.importorskip("transformers")


def reference_and_ours(case: Case, directory, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.ReformerConfig(**case.config_values)
    reference = getattr(transformers, case.model_class)(config).eval()
    reference.save_pretrained(directory)
    ours = getattr(reformer, case.model_class).from_pretrained(directory)
    return reference, ours


def labels_for(case: Case, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    batch = input_ids.shape[0]
    if case.model_class in ("ReformerModelWithLMHead", "ReformerForMaskedLM"):
        return {"labels": input_ids.masked_fill(attention_mask == 0, -100)}
    if case.model_class == "ReformerForSequenceClassification":
        num_labels = case.config_values.get("num_labels", 2)
        if num_labels == 1:
            return {"labels": torch.linspace(-1, 1, batch)}
        return {"labels": torch.arange(batch) % num_labels}
    if case.model_class == "ReformerForQuestionAnswering":
        return {"start_positions": torch.zeros(batch, dtype=torch.long),
                "end_positions": torch.ones(batch, dtype=torch.long)}
    return {}
