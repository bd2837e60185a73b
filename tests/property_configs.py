"""Hypothesis strategies for the property test (tests/test_properties.py): a valid `transformers` Reformer config
for one of the five heads, its weights, one input shape and one attention mask.

What is drawn, within the limits that make a config one `transformers` runs:
- head: every model class; ReformerModelWithLMHead is causal (is_decoder), ReformerForMaskedLM bidirectional,
  the others either; a causal model looks at no chunk after (transformers and our config both refuse it).
- layers: 1 to 3, each "lsh" or "local"; 1 to 3 heads of size 1 to 8, hidden size 2 to 24, vocabulary 2 to 16,
  lengths up to LONGEST (small outputs: the rounding bound costs a backward pass per 512 output elements);
  every activation our config accepts.
- LSH: 1 to 4 hashing rounds; num_buckets an even int, a list of 2 or 3 even factors, or unset (transformers picks
  it from the first length it hashes: the test runs it at the maximum length first, where our config resolves
  it); hash_seed always set (unset, transformers draws new rotations on every call, which nothing can match).
- chunks: LSH and local chunk lengths 1 to 8, drawn apart; 0 to 2 chunks before, 0 or 1 after.
- positions: axial (two factors: transformers' evaluation path reads exactly two) or a plain table, for
  max_position_embeddings a multiple of the chunk lengths' lcm (transformers pads an input to that multiple and
  then needs positions for the padding).
- chunked feed-forward and LM head: off, or a chunk size dividing the lengths transformers chunks (it refuses
  others; ours takes any).
- weights: transformers' initialisation with a drawn initializer_range, then every layer norm's gain and shift and
  every bias drawn away from 1 and 0 (`weight_seed`), so that none of them drops out of the comparison.
- input: batch 1 to 3; length 1, odd, even or the maximum, never a shape the verifier checks
  (exporters.verify.default_shapes) nor the exporters' example shape, so the graphs run where nothing else did.
- mask: none, tail padding, left padding or holes, drawn per row; every row keeps a position, and sequence
  classification keeps position 0, which its logits read (outputs at masked positions are undefined)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from exporters.specs import example_length
from exporters.verify import default_shapes
from reformer.config import ACTIVATIONS, ReformerConfig
from tiny_configs import Case

HEADS = ("ReformerModel", "ReformerModelWithLMHead", "ReformerForMaskedLM", "ReformerForSequenceClassification",
         "ReformerForQuestionAnswering")
MASK_KINDS = ("none", "tail", "left", "holes")
# Lengths up to about this many positions (one lcm of the chunk lengths when that is longer).
LONGEST = 32
# Spread of the drawn layer-norm gains and shifts and of the biases around 1 and 0.
NORM_SPREAD, BIAS_SPREAD = 0.5, 0.2


@dataclass
class Example:
    model_class: str
    values: dict  # the config, as transformers.ReformerConfig takes it
    weight_seed: int
    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    features: dict  # what was drawn, by kind, for the run's tally

    @property
    def case(self) -> Case:
        return Case("property", self.model_class, self.values, len(self.input_ids[0]))

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.input_ids), torch.tensor(self.attention_mask)


def layer_norms_and_biases_drawn(model: torch.nn.Module, seed: int) -> None:
    """Gains around 1 and shifts around 0 in every layer norm, biases around 0 in every linear layer: the
    reference's initialisation leaves them at exactly 1 and 0, where a swapped or missing one goes unseen."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(NORM_SPREAD * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(NORM_SPREAD * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(BIAS_SPREAD * torch.randn(module.bias.shape, generator=generator))


@st.composite
def examples(draw) -> Example:
    model_class = draw(st.sampled_from(HEADS))
    values, features = draw(configs(model_class))
    config = ReformerConfig(**values)  # raises for a config our side would refuse: the strategy's bug
    max_length = values["max_position_embeddings"]
    avoided = set(default_shapes(config)) | {(2, example_length(config.padding_multiple, max_length))}
    batch, length = draw(st.tuples(st.integers(1, 3), lengths(max_length)).filter(lambda shape: shape not in avoided))
    values.update(draw(chunked_heads(values, length)))
    mask_kind = draw(st.sampled_from(MASK_KINDS))
    keep_first = model_class == "ReformerForSequenceClassification"
    attention_mask = [draw(mask_row(mask_kind, length, keep_first)) for _ in range(batch)]
    input_ids = [draw(st.lists(st.integers(0, values["vocab_size"] - 1), min_size=length, max_size=length))
                 for _ in range(batch)]
    features.update(mask=mask_kind, length=length_kind(length, max_length), batch=batch)
    return Example(model_class, values, draw(st.integers(0, 2**16)), input_ids, attention_mask, features)


@st.composite
def configs(draw, model_class: str) -> tuple[dict, dict]:
    """(config values, features) for `model_class`, without the chunked heads (they depend on the input)."""
    is_decoder = {"ReformerModelWithLMHead": True, "ReformerForMaskedLM": False}.get(model_class)
    if is_decoder is None:
        is_decoder = draw(st.booleans())
    attn_layers = draw(st.lists(st.sampled_from(["lsh", "local"]), min_size=1, max_size=3))
    hidden_size = draw(st.integers(2, 24))
    values = dict(
        attn_layers=attn_layers, is_decoder=is_decoder, hidden_size=hidden_size,
        num_attention_heads=draw(st.integers(1, 3)), attention_head_size=draw(st.integers(1, 8)),
        feed_forward_size=draw(st.integers(1, 32)), vocab_size=draw(st.integers(2, 16)),
        hidden_act=draw(st.sampled_from(ACTIVATIONS)), initializer_range=draw(st.sampled_from([0.02, 0.2, 1.0])),
        num_hashes=draw(st.integers(1, 4)), hash_seed=draw(st.integers(0, 2**16)),
        num_labels=2 if model_class == "ReformerForQuestionAnswering" else draw(st.integers(1, 3)),
    )
    for kind in ("lsh", "local"):
        values[f"{kind}_attn_chunk_length"] = draw(st.integers(1, 8))
        values[f"{kind}_num_chunks_before"] = draw(st.integers(0, 2))
        values[f"{kind}_num_chunks_after"] = 0 if is_decoder else draw(st.integers(0, 1))
    bucket_kind = draw(st.sampled_from(["int", "factorised", "unset"]))
    values["num_buckets"] = draw({
        "int": st.sampled_from([2, 4, 6, 8, 16]),
        "factorised": st.lists(st.sampled_from([2, 4, 6]), min_size=2, max_size=3),
        "unset": st.none(),
    }[bucket_kind])
    chunk_lengths = {"lsh": values["lsh_attn_chunk_length"], "local": values["local_attn_chunk_length"]}
    multiple = math.lcm(*(chunk_lengths[kind] for kind in set(attn_layers)))
    max_length = multiple * draw(st.integers(1, max(1, LONGEST // multiple)))
    values["max_position_embeddings"] = max_length
    axial = draw(st.booleans())
    values["axial_pos_embds"] = axial
    if axial:
        rows = draw(st.integers(1, max_length))
        values["axial_pos_shape"] = [rows, -(-max_length // rows) + draw(st.integers(0, 2))]
        first = draw(st.integers(1, hidden_size - 1))
        values["axial_pos_embds_dim"] = [first, hidden_size - first]
    layer_kinds = set(attn_layers)
    features = dict(
        head=model_class, layers="mixed" if len(layer_kinds) == 2 else f"{attn_layers[0]} only",
        decoder=is_decoder, positions="axial" if axial else "plain", num_layers=len(attn_layers),
        hashes=values["num_hashes"] if "lsh" in layer_kinds else "-",
        buckets=bucket_kind if "lsh" in layer_kinds else "-",
        chunk_lengths="differ" if len(layer_kinds) == 2 and len(set(chunk_lengths.values())) == 2 else "one",
        chunks_after="yes" if any(values[f"{kind}_num_chunks_after"] for kind in layer_kinds) else "no",
    )
    return values, features


def lengths(max_length: int) -> st.SearchStrategy[int]:
    odd = st.integers(0, (max_length - 1) // 2).map(lambda half: 2 * half + 1)
    return st.one_of(st.just(1), st.just(max_length), odd, st.integers(1, max_length))


def length_kind(length: int, max_length: int) -> str:
    if length in (1, max_length):
        return "1" if length == 1 else "max"
    return "odd" if length % 2 else "even"


def reference_encoder_length(length: int, config: ReformerConfig) -> int:
    """The length transformers' layers run at: padded to the lcm of the chunk lengths when longer than the
    shortest chunk and not a multiple of the lcm (ReformerModel.forward), else as given."""
    multiple = config.padding_multiple
    if length > min(config.chunk_lengths) and length % multiple:
        return -(-length // multiple) * multiple
    return length


@st.composite
def chunked_heads(draw, values: dict, length: int) -> dict:
    """chunk_size_feed_forward dividing every length transformers' feed-forward runs at (the input's, and the
    maximum where num_buckets is unset and the test first runs it there), chunk_size_lm_head dividing the input's
    length (transformers' LM head runs on the unpadded output); 0: no chunking."""
    config = ReformerConfig(**values)
    feed_forward_length = reference_encoder_length(length, config)
    if values["num_buckets"] is None:
        feed_forward_length = math.gcd(feed_forward_length, values["max_position_embeddings"])
    return dict(chunk_size_feed_forward=draw(st.sampled_from([0, *divisors(feed_forward_length)])),
                chunk_size_lm_head=draw(st.sampled_from([0, *divisors(length)])))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def mask_row(draw, kind: str, length: int, keep_first: bool) -> list[int]:
    """One row of an attention mask of `kind` that keeps at least one position (and position 0 with
    `keep_first`: a left-padded row then keeps everything)."""
    if kind == "none":
        return [1] * length
    kept = draw(st.integers(1, length))
    if kind == "tail":
        return [1] * kept + [0] * (length - kept)
    if kind == "left":
        kept = length if keep_first else kept
        return [0] * (length - kept) + [1] * kept
    row = draw(st.lists(st.integers(0, 1), min_size=length, max_size=length))
    if keep_first or not any(row):
        row[0] = 1
    return row
