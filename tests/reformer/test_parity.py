"""Our model against the `transformers` reference, weights loaded through save_pretrained/from_pretrained.

Tolerance: the first-order rounding bound of our model's computation, element by element, on every output
and the loss (tests/rounding.py: both programs run the same products and reductions of the same values, each
within half the bound of the exact result). Per-position outputs are compared where the attention mask keeps
the position: at masked positions both models return values that depend on their
internal padding (the reference attends over a different number of padding keys), which no caller may use."""

from dataclasses import fields

import pytest
import torch

from reference import labels_for, reference_and_ours
from rounding import assert_within, rounding_bound
from tiny_configs import CASES, CASES_BY_NAME, make_inputs, output_names, per_position


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("batch", [1, 2])
def test_matches_reference(case, batch, tmp_path):
    reference, ours = reference_and_ours(case, tmp_path)
    input_ids, attention_mask = make_inputs(batch, case.length)
    labels = labels_for(case, input_ids, attention_mask)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask, **labels)
        actual = ours(input_ids=input_ids, attention_mask=attention_mask, **labels)
    bounds = rounding_bound(lambda: ours(input_ids=input_ids, attention_mask=attention_mask, **labels))
    for name in output_names(case.model_class):
        keep = attention_mask.bool() if per_position(case.model_class, name) else None
        assert_within(getattr(actual, name), getattr(expected, name), bounds[name], name, keep)
    if getattr(expected, "loss", None) is not None:
        assert_within(actual.loss, expected.loss, bounds["loss"], "loss")


@pytest.mark.parametrize("case", [c for c in CASES if c.length > 4], ids=lambda case: case.name)
def test_unmasked_inputs_match_reference_everywhere(case, tmp_path):
    reference, ours = reference_and_ours(case, tmp_path)
    input_ids, _ = make_inputs(2, case.length)
    with torch.no_grad():
        expected = reference(input_ids=input_ids)
        actual = ours(input_ids=input_ids)
    bounds = rounding_bound(lambda: ours(input_ids=input_ids))
    for name in output_names(case.model_class):
        assert_within(getattr(actual, name), getattr(expected, name), bounds[name], name)


def test_sequence_classification_output_has_the_references_fields_in_order(tmp_path):
    """Its own output type (not the language models'), with the reference's fields, in the reference's order
    (a `return_dict=False` tuple unpacks alike), then the buckets."""
    case = CASES_BY_NAME["seqcls_mixed"]
    reference, ours = reference_and_ours(case, tmp_path)
    input_ids, attention_mask = make_inputs(2, case.length)
    arguments = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                     **labels_for(case, input_ids, attention_mask))
    with torch.no_grad():
        expected, actual = reference(**arguments), ours(**arguments)
    assert type(actual).__name__ == "ReformerSequenceClassifierOutput"
    assert [field.name for field in fields(actual)] == [*expected.keys(), "buckets"]
    assert actual.logits.shape == expected.logits.shape == (2, case.config_values.get("num_labels", 2))
