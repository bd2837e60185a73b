"""ReformerConfig: the fields of `transformers`' Reformer `config.json`, validated, plus loading and saving."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "config.json"
# Seed used for the LSH rotations when a config leaves `hash_seed` unset. The reference then draws fresh
# rotations on every call, which no exported graph can reproduce; we fix them instead and record the seed.
DEFAULT_HASH_SEED = 0
ATTENTION_TYPES = ("lsh", "local")
# How chunk attention is computed (the names transformers gives its implementations): the same numbers either way.
ATTN_IMPLEMENTATIONS = ("eager", "flex_attention")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh")


class ConfigError(ValueError):
    """A config that cannot describe a valid Reformer."""


@dataclass
class ReformerConfig:
    """Every field has the meaning and default of `transformers.ReformerConfig`.

    attention_head_size: size D of each attention head.
    attn_layers: one entry per layer, "lsh" or "local".
    axial_norm_std: std of the axial position embedding initialisation.
    axial_pos_embds: axial (factorised) position embeddings if true, a plain table otherwise.
    axial_pos_shape: factors of the axial table; their product bounds the sequence length.
    axial_pos_embds_dim: embedding size of each axial factor; they sum to `hidden_size`.
    chunk_size_lm_head: positions per LM-head chunk (0: no chunking); saves memory, same numbers.
    chunk_size_feed_forward: positions per feed-forward chunk (0: no chunking); saves memory, same numbers.
    eos_token_id, bos_token_id, pad_token_id: special token ids (`pad_token_id` fills internal padding).
    feed_forward_size: inner size of the feed-forward block.
    hash_seed: seed of the LSH random rotations (None: DEFAULT_HASH_SEED, see `resolved_hash_seed`).
    hidden_act: feed-forward activation.
    hidden_dropout_prob: dropout on embeddings, block outputs and the final hidden states.
    hidden_size: model width (each reversible stream; outputs are 2 * hidden_size wide).
    initializer_range: std of the normal initialisation of linear and embedding weights.
    is_decoder: causal attention if true.
    layer_norm_eps: epsilon of every LayerNorm.
    local_num_chunks_before / local_num_chunks_after: neighbouring chunks a local chunk attends to.
    local_attention_probs_dropout_prob: dropout on local attention probabilities.
    local_attn_chunk_length: chunk length C of local attention.
    lsh_attn_chunk_length: chunk length C of LSH attention.
    lsh_attention_probs_dropout_prob: dropout on LSH attention probabilities.
    lsh_num_chunks_before / lsh_num_chunks_after: neighbouring chunks an LSH chunk attends to.
    max_position_embeddings: longest sequence the model accepts.
    num_attention_heads: heads H.
    num_buckets: LSH buckets, an even int or a list of even factors (None: resolved from the maximum length).
    num_buckets_defaulted: set when `num_buckets` came unset and was resolved here (the reference resolves it
        later, from the first length it runs); not a config.json field.
    num_hashes: hashing rounds N.
    vocab_size: vocabulary size.
    tie_word_embeddings: kept for config round trips; Reformer heads are never tied.
    use_cache: whether generation uses the cache by default.
    classifier_dropout: dropout of the classification head (None: `hidden_dropout_prob`).
    num_labels: outputs of the classification and question-answering heads.
    problem_type: loss of sequence classification (None: picked from `num_labels` and the label dtype).
    use_reversible_backward: train through the memory-saving reversible backward (False: plain autograd).
    attn_implementation: how chunk attention runs, "eager" (matrix products and a softmax) or "flex_attention"
        (torch's FlexAttention, reformer/attention/flex.py; the same numbers, no faster yet). A
        choice of this installation, not of the checkpoint: config.json never records it (transformers'
        Reformer has no FlexAttention).
    """

    attention_head_size: int = 64
    attn_layers: list[str] = field(default_factory=lambda: ["local", "lsh", "local", "lsh", "local", "lsh"])
    axial_norm_std: float = 1.0
    axial_pos_embds: bool = True
    axial_pos_shape: list[int] = field(default_factory=lambda: [64, 64])
    axial_pos_embds_dim: list[int] = field(default_factory=lambda: [64, 192])
    chunk_size_lm_head: int = 0
    chunk_size_feed_forward: int = 0
    eos_token_id: int | None = 2
    bos_token_id: int | None = None
    pad_token_id: int | None = 0
    feed_forward_size: int = 512
    hash_seed: int | None = None
    hidden_act: str = "relu"
    hidden_dropout_prob: float = 0.05
    hidden_size: int = 256
    initializer_range: float = 0.02
    is_decoder: bool = False
    layer_norm_eps: float = 1e-12
    local_num_chunks_before: int = 1
    local_num_chunks_after: int = 0
    local_attention_probs_dropout_prob: float = 0.05
    local_attn_chunk_length: int = 64
    lsh_attn_chunk_length: int = 64
    lsh_attention_probs_dropout_prob: float = 0.0
    lsh_num_chunks_before: int = 1
    lsh_num_chunks_after: int = 0
    max_position_embeddings: int = 4096
    num_attention_heads: int = 12
    num_buckets: int | list[int] | None = None
    num_hashes: int = 1
    vocab_size: int = 320
    tie_word_embeddings: bool = False
    use_cache: bool = True
    classifier_dropout: float | None = None
    num_labels: int = 2
    problem_type: str | None = None
    use_reversible_backward: bool = True
    attn_implementation: str = "eager"
    num_buckets_defaulted: bool = field(default=False, compare=False)
    # Fields of config.json that this project does not use, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.attn_layers = list(self.attn_layers)
        self.axial_pos_shape = list(self.axial_pos_shape)
        self.axial_pos_embds_dim = list(self.axial_pos_embds_dim)
        if isinstance(self.num_buckets, (list, tuple)):
            self.num_buckets = [int(factor) for factor in self.num_buckets]
        self.validate()
        if self.num_buckets is None and "lsh" in self.attn_layers:
            self.num_buckets = buckets_for_length(
                self.max_position_embeddings, self.lsh_attn_chunk_length, self.max_position_embeddings
            )
            self.num_buckets_defaulted = True

    # ----- derived values -----
    @property
    def num_hidden_layers(self) -> int:
        return len(self.attn_layers)

    @property
    def resolved_hash_seed(self) -> int:
        return DEFAULT_HASH_SEED if self.hash_seed is None else self.hash_seed

    @property
    def chunk_lengths(self) -> list[int]:
        """Chunk lengths of the attention types in use."""
        lengths = {"lsh": self.lsh_attn_chunk_length, "local": self.local_attn_chunk_length}
        return [lengths[kind] for kind in sorted(set(self.attn_layers))]

    @property
    def padding_multiple(self) -> int:
        """Inputs are padded inside the model to a multiple of this (the lcm of the chunk lengths)."""
        return math.lcm(*self.chunk_lengths)

    @property
    def lsh_unchunked_length(self) -> int:
        """Inputs up to this length get plain full attention in the reference's LSH layers: it pads only
        inputs longer than the shortest chunk, and skips hashing when the padded input fits one chunk."""
        if self.padding_multiple == self.lsh_attn_chunk_length:
            return self.lsh_attn_chunk_length
        return min(self.chunk_lengths)

    @property
    def bucket_count(self) -> int:
        """Total LSH buckets per hashing round (the product of factorised `num_buckets`)."""
        if isinstance(self.num_buckets, list):
            return math.prod(self.num_buckets)
        return int(self.num_buckets)

    @property
    def rotation_size(self) -> int:
        """Width of the random rotation: `num_buckets`, or the sum of its factors."""
        if isinstance(self.num_buckets, list):
            return sum(self.num_buckets)
        return int(self.num_buckets)

    @property
    def base_parameter_count(self) -> int:
        """Parameters of the base model (ReformerModel; a head adds its own): embeddings, and per layer the
        attention projections, the feed-forward block and their layer norms; known before any is allocated."""
        hidden, inner = self.hidden_size, self.num_attention_heads * self.attention_head_size
        if self.axial_pos_embds:
            positions = sum(length * dim for length, dim in zip(self.axial_pos_shape, self.axial_pos_embds_dim))
        else:
            positions = self.max_position_embeddings * hidden
        projections = {"lsh": 2, "local": 3}  # LSH shares one projection between queries and keys
        attention = sum(projections[kind] * hidden * inner + inner * hidden + 2 * hidden for kind in self.attn_layers)
        feed_forward = self.num_hidden_layers * (2 * hidden + 2 * hidden * self.feed_forward_size
                                                 + self.feed_forward_size + hidden)
        return self.vocab_size * hidden + positions + attention + feed_forward + 4 * hidden

    def validate(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ConfigError(message)

        require(len(self.attn_layers) > 0, "attn_layers is empty: give at least one of 'lsh', 'local'")
        unknown = sorted(set(self.attn_layers) - set(ATTENTION_TYPES))
        require(not unknown, f"attn_layers has unknown types {unknown}: use only 'lsh' and 'local'")
        require(self.attn_implementation in ATTN_IMPLEMENTATIONS,
                f"attn_implementation {self.attn_implementation!r} is not one of {list(ATTN_IMPLEMENTATIONS)}")
        require(self.hidden_act in ACTIVATIONS, f"hidden_act {self.hidden_act!r} is not one of {list(ACTIVATIONS)}")
        for name in ("hidden_size", "attention_head_size", "num_attention_heads", "feed_forward_size",
                     "vocab_size", "max_position_embeddings", "num_hashes", "lsh_attn_chunk_length",
                     "local_attn_chunk_length"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        for name in ("lsh_num_chunks_before", "lsh_num_chunks_after", "local_num_chunks_before",
                     "local_num_chunks_after", "chunk_size_lm_head", "chunk_size_feed_forward"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 0, f"{name} must be a non-negative integer, got {value!r}")
        if self.axial_pos_embds:
            require(len(self.axial_pos_shape) == len(self.axial_pos_embds_dim),
                    "axial_pos_shape and axial_pos_embds_dim must have the same length")
            require(sum(self.axial_pos_embds_dim) == self.hidden_size,
                    f"axial_pos_embds_dim {self.axial_pos_embds_dim} must sum to hidden_size {self.hidden_size}")
            require(math.prod(self.axial_pos_shape) >= self.max_position_embeddings,
                    f"axial_pos_shape {self.axial_pos_shape} covers {math.prod(self.axial_pos_shape)} positions, "
                    f"fewer than max_position_embeddings {self.max_position_embeddings}")
        factors = self.num_buckets if isinstance(self.num_buckets, list) else (
            [] if self.num_buckets is None else [self.num_buckets])
        for factor in factors:
            require(isinstance(factor, int) and factor >= 2 and factor % 2 == 0,
                    f"num_buckets must be even (or a list of even factors), got {self.num_buckets!r}")
        if self.is_decoder:
            if "lsh" in self.attn_layers:
                require(self.lsh_num_chunks_after == 0, "a causal model (is_decoder) needs lsh_num_chunks_after = 0")
            if "local" in self.attn_layers:
                require(self.local_num_chunks_after == 0,
                        "a causal model (is_decoder) needs local_num_chunks_after = 0")

    # ----- config.json io -----
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ReformerConfig":
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "num_buckets_defaulted"}
        if "id2label" in values and "num_labels" not in values:
            values["num_labels"] = len(values["id2label"])
        values.pop("num_hidden_layers", None)  # derived from attn_layers
        kwargs = {key: values.pop(key) for key in list(values) if key in known}
        return cls(**kwargs, extra=values)

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("extra", "attn_implementation", "num_buckets_defaulted")}
        values["num_hidden_layers"] = self.num_hidden_layers
        values["model_type"] = "reformer"
        values.update(self.extra)
        return values

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ReformerConfig":
        try:
            with open(path, encoding="utf-8") as handle:
                values = json.load(handle)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON ({error})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        if values.get("model_type", "reformer") != "reformer":
            raise ConfigError(f"{path} describes a {values['model_type']!r} model, not a Reformer")
        try:
            return cls.from_dict(values)
        except TypeError as error:
            raise ConfigError(f"{path}: {error}") from None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ReformerConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ConfigError(f"no {CONFIG_NAME} in {directory}")
        return cls.from_json_file(path)


def buckets_for_length(sequence_length: int, chunk_length: int, max_position_embeddings: int) -> int | list[int]:
    """The reference's rule for unset `num_buckets`: about 2 * length / chunk, a power of two, factorised
    into two factors when it exceeds 2 * max(sqrt(max_len / chunk), chunk)."""
    exponent = (2 * (sequence_length // chunk_length)).bit_length() - 1
    exponent = max(exponent, 1)  # at least 2 buckets: shorter inputs fit one chunk anyway
    limit = 2 * max(int((max_position_embeddings // chunk_length) ** 0.5), chunk_length)
    if 2**exponent > limit:
        return [2 ** (exponent // 2), 2 ** (exponent - exponent // 2)]
    return 2**exponent
