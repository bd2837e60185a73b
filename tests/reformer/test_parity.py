"""Our model against the `transformers` reference, weights loaded through save_pretrained/from_pretrained.

Tolerance: the first-order rounding bound of our model's computation, element by element, on every output
and the loss (tests/rounding.py: both programs run the same products and reductions of the same values, each
within half the bound of the exact result). Per-position outputs are compared where the attention mask keeps
the position: at masked positions both models return values that depend on their
internal padding (the reference attends over a different number of padding keys), which no caller may use."""

from dataclasses import fields, replace

import pytest
import torch

import reformer
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


def test_a_query_that_sees_only_itself_matches_the_exact_logits(tmp_path):
    """Position 0 of a causal model sees only itself in every hashing round: each round's log-normaliser is
    the self-mask value -1e5, where fp32's spacing is 0.0078, and each round's output is the position's own
    value. The rounds' weights must come out 1/2 each: exp(l - logsumexp(l)) rounded logsumexp at that
    magnitude and gave 0.4989 each (the reference still does, so the comparison is with it in float64).
    Tolerance: exactly, a weighted mean of equal outputs is that output, so the exact logits at position 0 are
    those of the same weights with one round, which combines nothing; the first-order rounding bound of that
    one-round computation in fp32 (tests/rounding.py) bounds ours, since combining adds no rounding there
    (a max-subtracted softmax of two equal values is 1/2 exactly, and two halves of one value add exactly)."""
    case = CASES_BY_NAME["lm_lsh_factorised"]  # two LSH layers, two rounds, causal
    # Weights of scale 0.5, not 0.02: the attention's output then weighs in the logits beside the embeddings.
    case = replace(case, overrides={**case.overrides, "initializer_range": 0.5})
    reference, ours = reference_and_ours(case, tmp_path)
    one_round = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path, config=replace(ours.config, num_hashes=1))
    input_ids, _ = make_inputs(1, case.length)
    with torch.no_grad():
        actual = ours(input_ids=input_ids).logits[:, 0]
        exact = reference.double()(input_ids=input_ids).logits[:, 0]
    bound = rounding_bound(lambda: one_round(input_ids=input_ids).logits)[:, 0]
    assert_within(actual, exact, bound, "logits at position 0")
