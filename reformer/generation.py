"""Incremental decoding with the reference's cache semantics, and `generate` (greedy, top-k, top-p).

The cache (`DecoderCache`) is the reference's `past_buckets_states`: per layer the layer-normed attention
inputs of every past position, per LSH layer their buckets. `IncrementalDecoder` runs the prompt (`prefill`)
and then one token at a time (`step`) with static shapes (see `attention/cached.py`); the exporters trace
these same two methods, so eager and exported decoding share one implementation.

Buckets are stored per hashing round without the reference's round offsets (0 .. num_buckets - 1); our model
always reserves the padding bucket, so cached and new buckets always compare in the same numbering (the
reference's `increase_num_buckets` repairs the case where they would not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention.cached import local_attention_step, lsh_attention_step
from .attention.chunking import length_as_tensor
from .config import ReformerConfig
from .models import ReformerModelWithLMHead
from .sampling import TokenChooser, check_generation_length


@dataclass
class DecoderCache:
    """states: per layer B, Lp, hidden (the layer-normed attention input of every past position).
    buckets: per LSH layer (in layer order) B, H, N, Lp int64, every position's bucket in every round.
    lsh_full_attention_until: B int64, None without LSH layers: steps whose past length is at most this attend
    to every position, as the reference does until it has hashed anything (a prompt of at most
    `config.lsh_unchunked_length` tokens is not hashed; the reference then hashes at the first step that
    reaches `lsh_attn_chunk_length` positions)."""

    states: list[torch.Tensor]
    buckets: list[torch.Tensor]
    lsh_full_attention_until: torch.Tensor | None

    @property
    def past_length(self) -> int:
        return self.states[0].shape[1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The cache as flat tensors in the order of `cache_names`."""
        extra = () if self.lsh_full_attention_until is None else (self.lsh_full_attention_until,)
        return (*self.states, *self.buckets, *extra)

    @classmethod
    def from_tensors(cls, config: ReformerConfig, tensors: tuple[torch.Tensor, ...]) -> "DecoderCache":
        """The inverse of `tensors`."""
        layers, lsh_layers = config.num_hidden_layers, config.attn_layers.count("lsh")
        states, buckets = list(tensors[:layers]), list(tensors[layers : layers + lsh_layers])
        return cls(states, buckets, tensors[layers + lsh_layers] if lsh_layers else None)

    def reorder(self, beam_idx: torch.Tensor) -> "DecoderCache":
        """The cache of the rows `beam_idx` (beam search keeps, after each step, the best continuations)."""
        select = lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device))  # noqa: E731
        until = self.lsh_full_attention_until
        return DecoderCache([select(t) for t in self.states], [select(t) for t in self.buckets],
                            None if until is None else select(until))


def cache_names(config: ReformerConfig) -> list[str]:
    """Names of the cache tensors, in `DecoderCache.tensors` order (layer indices count all layers)."""
    names = [f"states_{index}" for index in range(config.num_hidden_layers)]
    names += [f"buckets_{index}" for index, kind in enumerate(config.attn_layers) if kind == "lsh"]
    if "lsh" in config.attn_layers:
        names.append("lsh_full_attention_until")
    return names


class IncrementalDecoder(nn.Module):
    """Prompt and single-token forward passes of a causal `ReformerModelWithLMHead`, through a cache."""

    def __init__(self, model: ReformerModelWithLMHead):
        super().__init__()
        if not model.config.is_decoder:
            raise ValueError("incremental decoding needs a causal model (is_decoder=True)")
        self.model = model
        self.config = model.config

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, DecoderCache]:
        """input_ids B, P -> logits B, P, V and the cache of the P prompt positions."""
        output = self.model(input_ids=input_ids, output_hidden_states=True)
        layers = self.model.reformer.encoder.layers
        # hidden_states[i] is the input of layer i's attention block; the cache holds it layer-normed.
        states = [layer.attention.layer_norm(hidden) for layer, hidden in zip(layers, output.hidden_states)]
        until = None
        if output.buckets:
            prompt_length = torch.ones_like(input_ids).sum(dim=1)  # B, all equal to P
            hashed = prompt_length > self.config.lsh_unchunked_length
            never = torch.full_like(prompt_length, -1)
            until = torch.where(hashed, never, prompt_length.clamp(min=self.config.lsh_attn_chunk_length - 1))
        return output.logits, DecoderCache(states, list(output.buckets), until)

    def step(self, input_ids: torch.Tensor, cache: DecoderCache) -> tuple[torch.Tensor, DecoderCache]:
        """input_ids B, 1 (the token after the cached positions) -> logits B, 1, V and the cache with it."""
        reformer = self.model.reformer
        past_length = length_as_tensor(cache.states[0], 1)  # 1: the new token's position
        position_ids = past_length.expand_as(input_ids)
        hidden = reformer.embeddings(reformer.embeddings.word_embeddings(input_ids), position_ids)  # B, 1, hidden
        full_attention = None
        if cache.lsh_full_attention_until is not None:
            full_attention = cache.lsh_full_attention_until >= past_length  # B
        y1, y2, states, buckets = hidden, hidden, [], []
        lsh_buckets = iter(cache.buckets)
        for layer, past_states in zip(reformer.encoder.layers, cache.states):
            normed = layer.attention.layer_norm(y2)
            attention = layer.attention.self_attention
            if layer.attention.is_lsh:
                past_buckets = next(lsh_buckets)
                attended, new_buckets = lsh_attention_step(attention, normed, past_states, past_buckets, full_attention)
                buckets.append(torch.cat([past_buckets, new_buckets], dim=-1))
            else:
                attended = local_attention_step(attention, normed, past_states)
            states.append(torch.cat([past_states, normed], dim=1))
            # The reversible residual of `ReformerLayer`: Y1 = X1 + Attention(X2), Y2 = X2 + FeedForward(Y1).
            y1 = y1 + layer.attention.output(attended)
            y2 = y2 + layer.feed_forward(y1)
        hidden = reformer.encoder.layer_norm(torch.cat([y1, y2], dim=-1))  # B, 1, 2*hidden
        return self.model.lm_head(hidden), DecoderCache(states, buckets, cache.lsh_full_attention_until)


@torch.no_grad()
def generate(
    model: ReformerModelWithLMHead,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    use_cache: bool = True,
    eos_token_id: int | None = None,
    do_sample: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """The prompt B, P followed by up to `max_new_tokens` new tokens. Greedy unless `do_sample` (then top-k
    and top-p sampling drawn from `seed`). A row that produced `eos_token_id` continues with the pad token
    (`config.pad_token_id`, else the eos id); generation stops early when every row has. Without the cache,
    every step reruns the whole sequence (the reference's `use_cache=False`)."""
    config = model.config
    check_generation_length(config.max_position_embeddings, input_ids.shape[1], max_new_tokens)
    model.eval()
    choose = TokenChooser(do_sample, top_k, top_p, seed, eos_token_id, config.pad_token_id)
    decoder = IncrementalDecoder(model)
    sequence, cache = input_ids, None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(input_ids=sequence).logits
        elif cache is None:
            logits, cache = decoder.prefill(sequence)
        else:
            logits, cache = decoder.step(sequence[:, -1:], cache)
        next_tokens = torch.from_numpy(choose(logits[:, -1].float().cpu().numpy())).to(input_ids.device)
        sequence = torch.cat([sequence, next_tokens[:, None]], dim=1)
        if choose.all_finished:
            break
    return sequence

