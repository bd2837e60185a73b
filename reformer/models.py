"""The Reformer model and its heads, with the reference's class names, forward signatures and output fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F

from .attention.local import LocalSelfAttention
from .attention.lsh import LSHSelfAttention
from .checkpoint import CheckpointMixin
from .config import ReformerConfig
from .embeddings import AxialPositionEmbeddings, ReformerEmbeddings
from .layers import ReformerLayer, apply_in_chunks
from .reversible import ReversibleStack


class ModelOutput:
    """Dataclass outputs that also unpack like the reference's `return_dict=False` tuples."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, index):
        return self.to_tuple()[index]


@dataclass
class ReformerModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    # Per LSH layer B, H, N, L: the bucket of every position in every hashing round (for verification).
    buckets: tuple[torch.Tensor, ...] | None = None


@dataclass
class ReformerLMOutput(ModelOutput):
    """The language models' output (causal and masked): logits B, L, vocab_size."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    buckets: tuple[torch.Tensor, ...] | None = None


@dataclass
class ReformerSequenceClassifierOutput(ModelOutput):
    """transformers' SequenceClassifierOutput, with the buckets: logits B, num_labels."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    buckets: tuple[torch.Tensor, ...] | None = None


@dataclass
class ReformerQuestionAnsweringOutput(ModelOutput):
    loss: torch.Tensor | None
    start_logits: torch.Tensor
    end_logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    buckets: tuple[torch.Tensor, ...] | None = None


class ReformerPreTrainedModel(CheckpointMixin, nn.Module):
    base_model_prefix = "reformer"

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.config = config

    def set_attn_implementation(self, attn_implementation: str) -> None:
        """Switch every attention layer to "eager" or "flex_attention" chunk attention (see ReformerConfig)."""
        dataclasses.replace(self.config, attn_implementation=attn_implementation)  # validates, or raises ConfigError
        self.config.attn_implementation = attn_implementation
        for module in self.modules():
            if isinstance(module, (LocalSelfAttention, LSHSelfAttention)):
                module.attn_implementation = attn_implementation

    def init_weights(self, root: nn.Module | None = None) -> None:
        """Draw the initial weights of every layer in `root` (default: the whole model)."""
        for module in (self if root is None else root).modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, AxialPositionEmbeddings):
                for weight in module.weights:
                    nn.init.normal_(weight, std=self.config.axial_norm_std)


class ReformerEncoder(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.use_reversible_backward = config.use_reversible_backward
        self.layers = nn.ModuleList([ReformerLayer(config, index) for index in range(config.num_hidden_layers)])
        # The two reversible streams are concatenated, so the final norm is over 2 * hidden_size.
        self.layer_norm = nn.LayerNorm(2 * config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        lsh_unchunked: torch.Tensor,
        output_hidden_states: bool = False,
        forced_buckets: tuple[torch.Tensor, ...] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
        """Returns B, L, 2*hidden, the buckets each LSH layer's hashing chose and (optionally) each layer's
        input. `forced_buckets` (one B, H, N, L per LSH layer, in layer order) replace the LSH layers' own
        hashing (inference only)."""
        all_hidden_states = [] if output_hidden_states else None
        if self.training and self.use_reversible_backward and torch.is_grad_enabled():
            if forced_buckets is not None:
                raise ValueError("forced_buckets is for inference: call model.eval() first")
            y1, y2, *buckets = ReversibleStack.apply(
                hidden_states, hidden_states, attention_mask, lsh_unchunked, self.layers, all_hidden_states
            )
        else:
            y1, y2, buckets = hidden_states, hidden_states, []
            forced = iter(forced_buckets or ())
            for layer in self.layers:
                if all_hidden_states is not None:
                    all_hidden_states.append(y2)
                layer_forced = next(forced) if forced_buckets is not None and layer.attention.is_lsh else None
                y1, y2, layer_buckets = layer(y1, y2, attention_mask, lsh_unchunked, layer_forced)
                if layer_buckets is not None:
                    buckets.append(layer_buckets)
            if all_hidden_states is not None:
                all_hidden_states.append(y2)
        output = F.dropout(self.layer_norm(torch.cat([y1, y2], dim=-1)), p=self.dropout, training=self.training)
        return output, tuple(buckets), None if all_hidden_states is None else tuple(all_hidden_states)


class ReformerModel(ReformerPreTrainedModel):
    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        self.embeddings = ReformerEmbeddings(config)
        self.encoder = ReformerEncoder(config)
        self.init_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        forced_buckets: tuple[torch.Tensor, ...] | None = None,
    ):
        """`forced_buckets`: one B, H, N, L int64 tensor per LSH layer (the `buckets` of an earlier output at
        the same inputs), used instead of hashing; the output's `buckets` are still those the hashing chose.
        Verification runs an exported graph with eager's buckets this way, to tell hashing near-ties apart
        from arithmetic differences."""
        inputs_embeds, attention_mask, position_ids, length, lsh_unchunked = self.pad_inputs(
            input_ids, attention_mask, position_ids, inputs_embeds
        )
        if forced_buckets is not None:
            forced_buckets = self.pad_forced_buckets(forced_buckets, attention_mask)
        hidden_states = self.embeddings(inputs_embeds, position_ids)
        hidden_states, buckets, all_hidden_states = self.encoder(
            hidden_states, attention_mask, lsh_unchunked, output_hidden_states, forced_buckets
        )
        # Drop the internal padding again. index_select rather than a slice: a slice's contiguity depends on
        # whether any padding was added, which torch.export would otherwise specialise on.
        real_positions = torch.arange(length, device=hidden_states.device)
        output = ReformerModelOutput(
            last_hidden_state=hidden_states.index_select(1, real_positions),
            hidden_states=None if all_hidden_states is None else tuple(
                h.index_select(1, real_positions) for h in all_hidden_states),
            buckets=tuple(b.index_select(-1, real_positions) for b in buckets),
        )
        return output if return_dict else output.to_tuple()

    def pad_forced_buckets(self, forced_buckets: tuple[torch.Tensor, ...], attention_mask: torch.Tensor
                           ) -> tuple[torch.Tensor, ...]:
        """Forced buckets B, H, N, L to the internally padded length of attention_mask (B, Lp, bool); positions
        the mask excludes take the padding bucket, as the model's own hashing gives them."""
        lsh_layers = self.config.attn_layers.count("lsh")
        if len(forced_buckets) != lsh_layers:
            raise ValueError(f"forced_buckets has {len(forced_buckets)} tensors, the model has {lsh_layers} LSH layers")
        # A gather to the padded length rather than a pad: its length is the mask's, which torch.export then
        # knows equals the hashed buckets' length.
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        positions = torch.where(positions < forced_buckets[0].shape[-1], positions, 0) if forced_buckets else positions
        excluded = ~attention_mask[:, None, None, :]
        return tuple(buckets.index_select(-1, positions).masked_fill(excluded, self.config.bucket_count)
                     for buckets in forced_buckets)

    def pad_inputs(self, input_ids, attention_mask, position_ids, inputs_embeds):
        """Pad every input to a multiple of the chunk lengths, so that chunk shapes are static and one graph
        serves every length. Pad positions are masked out: they change no output at a real position.
        Returns embeddings B, L, hidden, mask B, L (bool), position ids B, L, the unpadded length, and
        whether the unpadded input is short enough for the reference's unchunked LSH path (0-d bool)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        config = self.config
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if attention_mask is not None and attention_mask.shape != (batch, length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, inputs have {(batch, length)}")
        if position_ids is not None and position_ids.shape != (batch, length):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, inputs have {(batch, length)}")
        if length > config.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings {config.max_position_embeddings}"
            )
        # A tensor, not a Python bool, so that one traced graph serves short and long inputs alike.
        real_length = torch.ones_like((input_ids if input_ids is not None else inputs_embeds[..., 0])[0]).sum()
        lsh_unchunked = real_length <= config.lsh_unchunked_length
        multiple = config.padding_multiple
        # Written as chunks * multiple, so that torch.export can prove the padded length divisible.
        padding = (length + multiple - 1) // multiple * multiple - length
        if inputs_embeds is None:
            inputs_embeds = self.embeddings.word_embeddings(F.pad(input_ids, (0, padding), value=config.pad_token_id or 0))
        else:
            pad_ids = torch.full((batch, padding), config.pad_token_id or 0, dtype=torch.long, device=inputs_embeds.device)
            inputs_embeds = torch.cat([inputs_embeds, self.embeddings.word_embeddings(pad_ids)], dim=1)
        device = inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones((batch, length), dtype=torch.bool, device=device)
        attention_mask = F.pad(attention_mask.to(torch.bool), (0, padding), value=False)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=device).unsqueeze(0).expand(batch, -1)
        else:
            position_ids = F.pad(position_ids, (0, padding), value=0)
        # Pad positions past the table would index out of range; their value is never seen.
        position_ids = position_ids.clamp(max=config.max_position_embeddings - 1)
        return inputs_embeds, attention_mask, position_ids, length, lsh_unchunked


class ReformerOnlyLMHead(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.chunk_size = config.chunk_size_lm_head
        self.decoder = nn.Linear(2 * config.hidden_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return apply_in_chunks(self.decoder, hidden_states, self.chunk_size)


class LanguageModel(ReformerPreTrainedModel):
    """The base model and an LM head; subclasses fix the direction of attention and the loss."""

    causal: bool

    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        if config.is_decoder != self.causal:
            direction = "a causal config (is_decoder=True)" if self.causal else "a bidirectional config (is_decoder=False)"
            raise ValueError(f"{type(self).__name__} needs {direction}")
        self.reformer = ReformerModel(config)
        self.lm_head = ReformerOnlyLMHead(config)
        self.init_weights(self.lm_head)  # the ReformerModel initialised its own weights

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_hidden_states=False, return_dict=True, forced_buckets=None):
        base = self.reformer(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states,
                             forced_buckets=forced_buckets)
        logits = self.lm_head(base.last_hidden_state)
        loss = None if labels is None else self.language_model_loss(logits, labels)
        output = ReformerLMOutput(loss, logits, base.hidden_states, base.buckets)
        return output if return_dict else output.to_tuple()

    def language_model_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.causal:  # each position predicts the next token
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


class ReformerModelWithLMHead(LanguageModel):
    """Causal language model: labels are the inputs; the loss predicts each next token (-100 is ignored)."""

    causal = True


class ReformerForMaskedLM(LanguageModel):
    """Bidirectional model predicting masked tokens; labels of -100 are ignored."""

    causal = False


class ReformerClassificationHead(nn.Module):
    """Classifies from the first position (the <s> / [CLS] token)."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.dense = nn.Linear(2 * config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        first = self.dropout(hidden_states[:, 0])
        return self.out_proj(self.dropout(torch.tanh(self.dense(first))))


class ReformerForSequenceClassification(ReformerPreTrainedModel):
    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        self.reformer = ReformerModel(config)
        self.classifier = ReformerClassificationHead(config)
        self.init_weights(self.classifier)  # the ReformerModel initialised its own weights

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_hidden_states=False, return_dict=True, forced_buckets=None):
        base = self.reformer(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states,
                             forced_buckets=forced_buckets)
        logits = self.classifier(base.last_hidden_state)
        loss = None if labels is None else self.classification_loss(logits, labels)
        output = ReformerSequenceClassifierOutput(loss, logits, base.hidden_states, base.buckets)
        return output if return_dict else output.to_tuple()

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The reference's rule: regression for one label, cross-entropy for integer labels, else BCE."""
        problem_type = self.config.problem_type
        if problem_type is None:
            if self.config.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        if problem_type == "regression":
            if self.config.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze())
            return F.mse_loss(logits, labels)
        if problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels)


class ReformerForQuestionAnswering(ReformerPreTrainedModel):
    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        self.reformer = ReformerModel(config)
        self.qa_outputs = nn.Linear(2 * config.hidden_size, config.num_labels)
        self.init_weights(self.qa_outputs)  # the ReformerModel initialised its own weights

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_hidden_states=False, return_dict=True,
                forced_buckets=None):
        base = self.reformer(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states,
                             forced_buckets=forced_buckets)
        start_logits, end_logits = self.qa_outputs(base.last_hidden_state).split(1, dim=-1)
        start_logits, end_logits = start_logits.squeeze(-1), end_logits.squeeze(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            # Positions outside the input are ignored, as in the reference.
            ignored = start_logits.shape[1]
            start_loss = F.cross_entropy(start_logits, start_positions.view(-1).clamp(0, ignored), ignore_index=ignored)
            end_loss = F.cross_entropy(end_logits, end_positions.view(-1).clamp(0, ignored), ignore_index=ignored)
            loss = (start_loss + end_loss) / 2
        output = ReformerQuestionAnsweringOutput(loss, start_logits, end_logits, base.hidden_states, base.buckets)
        return output if return_dict else output.to_tuple()


MODEL_CLASSES = {
    cls.__name__: cls
    for cls in (ReformerModel, ReformerModelWithLMHead, ReformerForMaskedLM, ReformerForSequenceClassification,
                ReformerForQuestionAnswering)
}
