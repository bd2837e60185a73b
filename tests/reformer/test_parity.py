"""Our model against the `transformers` reference, weights loaded through save_pretrained/from_pretrained.

Tolerance: max abs diff <= 1e-5 (fp32, CPU), on every output. Per-position outputs are compared where the
attention mask keeps the position: at masked positions both models return values that depend on their
internal padding (the reference attends over a different number of padding keys), which no caller may use."""

import pytest
import torch

from reference import labels_for, reference_and_ours
from tiny_configs import CASES, make_inputs, output_names, per_position

ATOL = 1e-5


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("batch", [1, 2])
def test_matches_reference(case, batch, tmp_path):
    reference, ours = reference_and_ours(case, tmp_path)
    input_ids, attention_mask = make_inputs(batch, case.length)
    labels = labels_for(case, input_ids, attention_mask)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask, **labels)
        actual = ours(input_ids=input_ids, attention_mask=attention_mask, **labels)
    keep = attention_mask.bool()
    for name in output_names(case.model_class):
        want, got = getattr(expected, name), getattr(actual, name)
        assert got.shape == want.shape, name
        if per_position(case.model_class, name):
            want, got = want[keep], got[keep]
        difference = (want - got).abs().max().item()
        assert difference <= ATOL, f"{name}: max abs diff {difference:.3g}"
    if getattr(expected, "loss", None) is not None:
        assert abs(expected.loss.item() - actual.loss.item()) <= ATOL


@pytest.mark.parametrize("case", [c for c in CASES if c.length > 4], ids=lambda case: case.name)
def test_unmasked_inputs_match_reference_everywhere(case, tmp_path):
    reference, ours = reference_and_ours(case, tmp_path)
    input_ids, _ = make_inputs(2, case.length)
    with torch.no_grad():
        expected = reference(input_ids=input_ids)
        actual = ours(input_ids=input_ids)
    for name in output_names(case.model_class):
        difference = (getattr(expected, name) - getattr(actual, name)).abs().max().item()
        assert difference <= ATOL, f"{name}: max abs diff {difference:.3g}"
