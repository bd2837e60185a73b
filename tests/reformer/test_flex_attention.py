"""attn_implementation="flex_attention" (reformer/attention/flex.py) against the default eager attention, on the
tiny-config table: the same model and inputs, with and without padding, must give the same outputs.

Both paths attend to the same keys with the same mask values; what differs is only the order of float
operations inside the attention (FlexAttention's reference computes its softmax and log-sum-exp its own way).
Measured: at most 1.2e-7 max abs over the table (multi-round LSH, where the rounds are weighted by the
log-sum-exp), 0 elsewhere. Tolerance: the first-order rounding bound of the eager computation, element by element
(tests/rounding.py; a few 1e-6 at most on these models): a wrong mask, a missing duplicate key or a misplaced
chunk moves outputs by 1e-2 or more."""

from __future__ import annotations

import json

import pytest
import torch

import reformer
from exporters.errors import ExportError
from exporters.specs import TASKS
from reformer.attention import flex
from reformer.config import ConfigError
from rounding import assert_within, rounding_bound
from tiny_configs import CASES, CASES_BY_NAME

# Eager FlexAttention warns once that it is not compiled: that is what these tests run on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def tiny_model(case):
    torch.manual_seed(0)
    return getattr(reformer, case.model_class)(reformer.ReformerConfig(**case.config_values)).eval()


@pytest.fixture
def flex_calls(monkeypatch) -> list[int]:
    """Counts FlexAttention calls, so that a test knows the path it meant to test ran."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return torch.nn.attention.flex_attention.flex_attention(*args, **kwargs)

    monkeypatch.setattr(flex, "flex_attention", counting)
    return calls


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_flex_attention_equals_eager(case, flex_calls):
    model = tiny_model(case)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, model.config.vocab_size, (2, case.length), generator=generator)
    padded = torch.ones_like(input_ids)
    padded[1, (case.length + 1) // 2:] = 0  # the second row is half padding
    model.set_attn_implementation("eager")
    bounds = [rounding_bound(lambda: model(input_ids=input_ids, attention_mask=mask)[0]) for mask in (None, padded)]
    outputs = {}
    for implementation in ("eager", "flex_attention"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = [model(input_ids=input_ids, attention_mask=mask)[0] for mask in (None, padded)]
    assert len(flex_calls) == 2 * model.config.num_hidden_layers  # every layer, both forwards
    for eager, flexed, bound in zip(outputs["eager"], outputs["flex_attention"], bounds):
        assert_within(flexed, eager, bound, case.name)


def test_training_runs_the_eager_math(flex_calls):
    """FlexAttention has no attention dropout and no CPU backward: training steps use the eager math, so a
    flex model trains exactly as an eager one."""
    case = CASES_BY_NAME["mlm_mixed_4_hashes"]
    model = tiny_model(case).train()
    input_ids = torch.randint(1, model.config.vocab_size, (2, case.length), generator=torch.Generator().manual_seed(2))
    gradients = {}
    for implementation in ("eager", "flex_attention"):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        gradients[implementation] = [parameter.grad.clone() for parameter in model.parameters()]
    assert not flex_calls
    for eager, flexed in zip(gradients["eager"], gradients["flex_attention"]):
        assert torch.equal(eager, flexed)


def test_from_pretrained_selects_it_and_config_json_never_records_it(tmp_path):
    tiny_model(CASES_BY_NAME["lm_mixed"]).save_pretrained(tmp_path)
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
    model = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path, attn_implementation="flex_attention")
    assert model.config.attn_implementation == "flex_attention"
    attention = [layer.attention.self_attention for layer in model.reformer.encoder.layers]
    assert [module.attn_implementation for module in attention] == ["flex_attention"] * 2


def test_unknown_implementation_is_refused_and_changes_nothing():
    model = tiny_model(CASES_BY_NAME["lm_mixed"])
    with pytest.raises(ConfigError, match="attn_implementation 'sdpa' is not one of"):
        model.set_attn_implementation("sdpa")
    assert model.config.attn_implementation == "eager"


def test_exporters_refuse_flex_models_with_what_to_do():
    model = tiny_model(CASES_BY_NAME["lm_mixed"])
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ExportError, match=r"set_attn_implementation\('eager'\)"):
        TASKS["causal-lm"].wrap(model)
