"""The `transformers` reference as a test oracle: build a random reference model for a case, save it with
`save_pretrained`, and load the same weights into our class."""

from __future__ import annotations

import math

import pytest
import torch

import reformer
from tiny_configs import Case

transformers = pytest.importorskip("transformers")


def reference_and_ours(case: Case, directory, seed: int = 0, adjust_weights=None):
    """`adjust_weights(reference)`, when given, changes the reference's random weights before they are saved."""
    torch.manual_seed(seed)
    config = transformers.ReformerConfig(**case.config_values)
    reference = getattr(transformers, case.model_class)(config).eval()
    if adjust_weights is not None:
        adjust_weights(reference)
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


def settle_unset_buckets(reference, config: reformer.ReformerConfig) -> None:
    """With num_buckets unset, transformers sets it in each LSH layer from the first length the layer hashes;
    our config resolves it from max_position_embeddings. One run of the base model at the maximum length (a
    multiple of the chunk lengths, so unpadded) gives the reference the same value (checked)."""
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    with torch.no_grad():
        reference.base_model(input_ids=torch.ones(1, config.max_position_embeddings, dtype=torch.long))
    for module in reference.modules():
        if isinstance(module, LSHSelfAttention) and module.num_buckets is not None:  # None: nothing was hashed
            settled = list(module.num_buckets) if isinstance(module.num_buckets, (list, tuple)) else module.num_buckets
            assert settled == config.num_buckets, f"transformers set num_buckets {settled}, ours {config.num_buckets}"


def reference_run(reference, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """(the reference's output, the buckets each LSH layer hashed: B, H, N, L in our numbering), the buckets
    None when its LSH layers hashed nothing (an input within one chunk: they attend to everything).
    transformers numbers round r's buckets from r * (buckets + 1) when any position of the layer's input is
    padding (the padding bucket is the extra one), else from r * buckets, and hashes its own padded length."""
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    buckets = []

    def record(module, args, kwargs, output):
        if output.buckets is None:
            return
        mask = kwargs["attention_mask"]
        count = math.prod(module.num_buckets) if isinstance(module.num_buckets, (list, tuple)) else module.num_buckets
        step = count + 1 if mask is not None and not mask.bool().all() else count
        rounds = torch.arange(output.buckets.shape[2])[:, None]  # N, 1
        buckets.append((output.buckets - step * rounds)[..., :input_ids.shape[1]])

    handles = [module.register_forward_hook(record, with_kwargs=True) for module in reference.modules()
               if isinstance(module, LSHSelfAttention)]
    try:
        with torch.no_grad():
            output = reference(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return output, tuple(buckets) or None
