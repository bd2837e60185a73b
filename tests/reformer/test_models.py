"""Constructing the model classes: each draws every weight of its layers once (init_weights), a head model's
ReformerModel included."""

from collections import Counter

import pytest
import torch

import reformer
from reformer.models import ReformerPreTrainedModel
from tiny_configs import CASES

ONE_CASE_PER_CLASS = list({case.model_class: case for case in CASES}.values())
INIT_FUNCTIONS = ("normal_", "ones_", "zeros_")


def count_initialisations(monkeypatch) -> Counter:
    """From now on, how many times init_weights writes each tensor (by id); the layers' own constructors,
    which init_weights overwrites, are not counted."""
    counts, inside = Counter(), []
    for name in INIT_FUNCTIONS:
        original = getattr(torch.nn.init, name)

        def spy(tensor, *args, original=original, **kwargs):
            if inside:
                counts[id(tensor)] += 1
            return original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, spy)
    init_weights = ReformerPreTrainedModel.init_weights

    def counted_init_weights(self, *args, **kwargs):
        inside.append(self)
        try:
            init_weights(self, *args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(ReformerPreTrainedModel, "init_weights", counted_init_weights)
    return counts


@pytest.mark.parametrize("case", ONE_CASE_PER_CLASS, ids=lambda case: case.model_class)
def test_every_weight_is_initialised_once(case, monkeypatch):
    counts = count_initialisations(monkeypatch)
    model = getattr(reformer, case.model_class)(reformer.ReformerConfig(**case.config_values))
    assert {name: counts[id(parameter)] for name, parameter in model.named_parameters()} == {
        name: 1 for name, _ in model.named_parameters()}


@pytest.mark.parametrize("case", [case for case in ONE_CASE_PER_CLASS if case.model_class != "ReformerModel"],
                         ids=lambda case: case.model_class)
def test_a_head_models_base_has_a_plain_models_weights(case):
    """The head draws its own layers after the base: from one seed, the base's weights are a ReformerModel's."""
    config = reformer.ReformerConfig(**case.config_values)
    torch.manual_seed(0)
    plain = reformer.ReformerModel(config)
    torch.manual_seed(0)
    head_model = getattr(reformer, case.model_class)(config)
    for name, weight in plain.state_dict().items():
        assert torch.equal(head_model.reformer.state_dict()[name], weight), name
