"""Training: the loss and every parameter gradient, through our reversible recomputing backward.

Gradient error is measured per parameter as max|g_ours - g_ref| / max|g_ref|: normalising by the largest
entry of the parameter's gradient (not element by element) keeps entries that are zero or tiny from turning
rounding into huge relative errors, while any error that matters at the scale of that parameter's update
still shows. Tolerance 1e-4: our side is fp32 (eps 1.2e-7), the reference float64, and the reversible
backward rebuilds each layer's inputs by subtraction (X2 = Y2 - FeedForward(Y1)), which loses a few bits per
layer; 1e-4 leaves room for that and is still ~1000x smaller than the error of, for instance, a dropped or
doubled gradient term."""

import contextlib
import dataclasses

import pytest
import torch

import reformer
import reformer.reversible
from reference import reference_and_ours
from tiny_configs import Case, make_inputs

RELATIVE_TOLERANCE = 1e-4
BATCH = 2
# The reference trains only at length == prod(axial_pos_shape) (4 * 8) and a multiple of the chunk lengths.
LENGTH = 32
TRAINING_CASES = [
    Case("lm_mixed_train", "ReformerModelWithLMHead",
         dict(attn_layers=["local", "lsh", "local", "lsh"], is_decoder=True, num_hashes=2), LENGTH),
    Case("mlm_mixed_train", "ReformerForMaskedLM",
         dict(attn_layers=["lsh", "local", "lsh"], num_hashes=3, num_buckets=[2, 4], lsh_num_chunks_after=1,
              local_num_chunks_after=1, hidden_act="gelu"), LENGTH),
]
DROPOUT = dict(hidden_dropout_prob=0.1, lsh_attention_probs_dropout_prob=0.1,
               local_attention_probs_dropout_prob=0.1)


def training_labels(model_class: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels that use only outputs at kept positions (outputs at masked positions are not defined, see
    test_parity.py): a causal LM scores the logits at position i against the token at i + 1, so both must be
    kept."""
    ignored = attention_mask == 0
    if model_class == "ReformerModelWithLMHead":
        ignored[:, 1:] |= ignored[:, :-1].clone()
    return input_ids.masked_fill(ignored, -100)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().item()
    assert scale > 0, "reference gradient is all zeros: the test would prove nothing"
    return (ours.double() - reference).abs().max().item() / scale


@contextlib.contextmanager
def fp32_random_rotations(monkeypatch):
    """The float64 reference draws its LSH rotations as fp32 draws them (torch.randn draws other numbers for
    float64), widened: the rotations ours uses, in the reference's precision."""
    draw = torch.randn

    def randn_as_fp32(*shape, dtype=None, **options):
        return draw(*shape, dtype=torch.float32, **options).to(dtype or torch.get_default_dtype())

    with monkeypatch.context() as patch:
        patch.setattr(torch, "randn", randn_as_fp32)
        yield


def loss_and_gradients(model, input_ids, attention_mask, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    gradients = {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}
    return loss.item(), gradients


@pytest.fixture
def count_reversible_layers(monkeypatch):
    """Counts layers run backwards by the reversible stack, to prove which path a training step took."""
    calls = []
    original = reformer.reversible.backward_through_layer

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(reformer.reversible, "backward_through_layer", counting)
    return calls


@pytest.mark.parametrize("case", TRAINING_CASES, ids=lambda case: case.name)
def test_loss_and_gradients_match_reference(case, tmp_path, count_reversible_layers, monkeypatch):
    reference, ours = reference_and_ours(case, tmp_path)
    # The reference runs in float64: in fp32 it weighs hashing rounds by exp(l - logsumexp(l)), whose
    # log-sum-exp rounds at the -1e5 self-mask's magnitude (an ulp of 0.0078) and moves a self-masked row's
    # weights by 0.2%; ours does not (a softmax over the rounds), so only float64 is a reference for it.
    reference.double().train()
    ours.train()
    input_ids, attention_mask = make_inputs(BATCH, LENGTH)
    labels = training_labels(case.model_class, input_ids, attention_mask)

    with fp32_random_rotations(monkeypatch):
        reference_loss, reference_gradients = loss_and_gradients(reference, input_ids, attention_mask, labels)
    our_loss, our_gradients = loss_and_gradients(ours, input_ids, attention_mask, labels)

    assert len(count_reversible_layers) == len(case.config_values["attn_layers"])
    assert abs(our_loss - reference_loss) <= RELATIVE_TOLERANCE * abs(reference_loss)
    # Every parameter of ours gets a gradient, and so does every reference parameter the reference uses
    # (transformers keeps an unused `lm_head.bias` next to `lm_head.decoder.bias`).
    assert set(our_gradients) == {name for name, _ in ours.named_parameters()}
    assert set(reference_gradients) == set(our_gradients)
    errors = {name: relative_error(our_gradients[name], reference_gradients[name]) for name in our_gradients}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RELATIVE_TOLERANCE, f"{worst}: relative gradient error {errors[worst]:.3g}"


@pytest.mark.parametrize("case", TRAINING_CASES, ids=lambda case: case.name)
def test_reversible_backward_matches_plain_autograd_with_dropout(case, count_reversible_layers):
    """Same seed, same dropout masks: the recomputing backward must replay every mask exactly. Tolerance: as
    above (1e-4 of each parameter's largest gradient entry; only the reconstruction by subtraction and
    summation order differ), and 1e-5 relative on the loss, whose forward computations are identical."""
    config = reformer.ReformerConfig(**{**case.config_values, **DROPOUT})
    model_class = getattr(reformer, case.model_class)
    reversible = model_class(config).train()
    plain = model_class(dataclasses.replace(config, use_reversible_backward=False)).train()
    plain.load_state_dict(reversible.state_dict())
    input_ids, attention_mask = make_inputs(BATCH, LENGTH)
    labels = training_labels(case.model_class, input_ids, attention_mask)

    torch.manual_seed(1)
    reversible_loss, reversible_gradients = loss_and_gradients(reversible, input_ids, attention_mask, labels)
    assert len(count_reversible_layers) == config.num_hidden_layers
    torch.manual_seed(1)
    plain_loss, plain_gradients = loss_and_gradients(plain, input_ids, attention_mask, labels)
    assert len(count_reversible_layers) == config.num_hidden_layers, "plain autograd took the reversible path"
    torch.manual_seed(2)
    _, other_masks_gradients = loss_and_gradients(plain, input_ids, attention_mask, labels)

    assert abs(reversible_loss - plain_loss) <= 1e-5 * abs(plain_loss)
    # Dropout is really on, and a wrong mask would show: other masks move every parameter's gradient by far
    # more than the tolerance (measured: at least 2e-2 of its largest entry).
    for name in plain_gradients:
        assert relative_error(other_masks_gradients[name], plain_gradients[name]) > 10 * RELATIVE_TOLERANCE, name
    assert "reformer.embeddings.word_embeddings.weight" in reversible_gradients
    assert set(reversible_gradients) == set(plain_gradients) == {name for name, _ in plain.named_parameters()}
    errors = {name: relative_error(reversible_gradients[name], plain_gradients[name]) for name in plain_gradients}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RELATIVE_TOLERANCE, f"{worst}: relative gradient error {errors[worst]:.3g}"
    assert errors["reformer.embeddings.word_embeddings.weight"] <= RELATIVE_TOLERANCE
