"""Incremental decoding with the reference's cache semantics, and `generate` / `stream` (greedy, sampling,
repetition penalty, prompts of different lengths).

The cache (`DecoderCache`) is the reference's `past_buckets_states`: per layer the layer-normed attention
inputs of every past position, per LSH layer their buckets. `IncrementalDecoder` runs the prompt (`prefill`)
and then one token at a time (`step`) with static shapes (see `attention/cached.py`); the exporters trace
these same two methods, so eager and exported decoding share one implementation, and `generate` runs the loop
of `reformer.sampling` that ONNX Runtime generation runs.

Buckets are stored per hashing round without the reference's round offsets (0 .. num_buckets - 1); our model
always reserves the padding bucket, so cached and new buckets always compare in the same numbering (the
reference's `increase_num_buckets` repairs the case where they would not).

Rows of one batch may have cached different numbers of positions (prompts of different lengths, see
`reformer.sampling`): a row's positions are then the last ones of the cache, after `left_padding` positions
that hold filler (zero states, the padding bucket) which no attention sees.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .attention.cached import local_attention_step, lsh_attention_step
from .attention.chunking import length_as_tensor
from .config import ReformerConfig
from .models import ReformerModelWithLMHead
from .sampling import LEFT_PADDING, PAST_LENGTH, Prompts, TokenChooser, generation_steps
from .tokenizer import Tokenizer, text_generation


@dataclass
class DecoderCache:
    """states: per layer B, Lp, hidden (the layer-normed attention input of every past position).
    buckets: per LSH layer (in layer order) B, H, N, Lp int64, every position's bucket in every round.
    lsh_unchunked_until: B int64, None without LSH layers: steps whose past length (in the row's own
    positions) is at most this attend to every position, as the reference does until it has hashed anything
    (a prompt of at most `config.lsh_unchunked_length` tokens is not hashed; the reference then hashes at the
    first step that reaches `lsh_attn_chunk_length` positions).
    left_padding: B int64, the positions in front of each row's first one (see the module docstring)."""

    states: list[torch.Tensor]
    buckets: list[torch.Tensor]
    lsh_unchunked_until: torch.Tensor | None
    left_padding: torch.Tensor

    @property
    def past_length(self) -> int:
        return self.states[0].shape[1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The cache as flat tensors in the order of `cache_names`."""
        until = () if self.lsh_unchunked_until is None else (self.lsh_unchunked_until,)
        return (*self.states, *self.buckets, *until, self.left_padding)

    @classmethod
    def from_tensors(cls, config: ReformerConfig, tensors: tuple[torch.Tensor, ...]) -> "DecoderCache":
        """The inverse of `tensors`."""
        layers, lsh_layers = config.num_hidden_layers, config.attn_layers.count("lsh")
        states, buckets = list(tensors[:layers]), list(tensors[layers : layers + lsh_layers])
        return cls(states, buckets, tensors[layers + lsh_layers] if lsh_layers else None, tensors[-1])


def cache_names(config: ReformerConfig) -> list[str]:
    """Names of the cache tensors, in `DecoderCache.tensors` order (layer indices count all layers)."""
    return list(cache_layout(config))


def cache_layout(config: ReformerConfig) -> dict[str, dict]:
    """Every cache tensor, in `DecoderCache.tensors` order: its dtype, its shape (PAST_LENGTH for the axis of
    positions) and `padding_value`, what it holds at left-padding positions (None: it has no positions)."""
    layout = {f"states_{index}": {"dtype": "float32", "shape": ["batch_size", PAST_LENGTH, config.hidden_size],
                                  "padding_value": 0.0}
              for index in range(config.num_hidden_layers)}
    for index, kind in enumerate(config.attn_layers):
        if kind == "lsh":
            # The padding bucket sorts after every real bucket, so padding never enters a row's bucket order.
            layout[f"buckets_{index}"] = {"dtype": "int64", "padding_value": config.bucket_count, "shape": [
                "batch_size", config.num_attention_heads, config.num_hashes, PAST_LENGTH]}
    per_row = {"dtype": "int64", "shape": ["batch_size"], "padding_value": None}
    if "lsh" in config.attn_layers:
        layout["lsh_unchunked_until"] = per_row
    layout[LEFT_PADDING] = per_row
    return layout


class IncrementalDecoder(nn.Module):
    """Prompt and single-token forward passes of a causal `ReformerModelWithLMHead`, through a cache."""

    def __init__(self, model: ReformerModelWithLMHead):
        super().__init__()
        if not model.config.is_decoder:
            raise ValueError("incremental decoding needs a causal model (is_decoder=True)")
        self.model = model
        self.config = model.config

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, DecoderCache]:
        """input_ids B, P (P tokens in every row) -> logits B, P, V and the cache of the P prompt positions."""
        output = self.model(input_ids=input_ids, output_hidden_states=True)
        layers = self.model.reformer.encoder.layers
        # hidden_states[i] is the input of layer i's attention block; the cache holds it layer-normed.
        states = [layer.attention.layer_norm(hidden) for layer, hidden in zip(layers, output.hidden_states)]
        prompt_length = torch.ones_like(input_ids).sum(dim=1)  # B, all equal to P
        until = None
        if output.buckets:
            hashed = prompt_length > self.config.lsh_unchunked_length
            never = torch.full_like(prompt_length, -1)
            until = torch.where(hashed, never, prompt_length.clamp(min=self.config.lsh_attn_chunk_length - 1))
        return output.logits, DecoderCache(states, list(output.buckets), until, torch.zeros_like(prompt_length))

    def step(self, input_ids: torch.Tensor, cache: DecoderCache) -> tuple[torch.Tensor, DecoderCache]:
        """input_ids B, 1 (the token after the cached positions) -> logits B, 1, V and the cache with it."""
        reformer = self.model.reformer
        # The new token's position in its own row: the cached positions less the row's padding.
        position = length_as_tensor(cache.states[0], 1) - cache.left_padding  # B
        hidden = reformer.embeddings(reformer.embeddings.word_embeddings(input_ids), position[:, None])  # B, 1, hidden
        lsh_unchunked = None
        if cache.lsh_unchunked_until is not None:
            lsh_unchunked = cache.lsh_unchunked_until >= position  # B
        y1, y2, states, buckets = hidden, hidden, [], []
        lsh_buckets = iter(cache.buckets)
        for layer, past_states in zip(reformer.encoder.layers, cache.states):
            normed = layer.attention.layer_norm(y2)
            attention = layer.attention.self_attention
            if layer.attention.is_lsh:
                past_buckets = next(lsh_buckets)
                attended, new_buckets = lsh_attention_step(attention, normed, past_states, past_buckets, lsh_unchunked,
                                                           cache.left_padding)
                buckets.append(torch.cat([past_buckets, new_buckets], dim=-1))
            else:
                attended = local_attention_step(attention, normed, past_states, cache.left_padding)
            states.append(torch.cat([past_states, normed], dim=1))
            y1, y2 = layer.add_residuals(y1, y2, layer.attention.output(attended))
        hidden = reformer.encoder.layer_norm(torch.cat([y1, y2], dim=-1))  # B, 1, 2*hidden
        cache = DecoderCache(states, buckets, cache.lsh_unchunked_until, cache.left_padding)
        return self.model.lm_head(hidden), cache


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode within; every submodule's own mode (train or eval) back afterwards. Per decoding
    step, so that a stream the caller has not finished leaves the caller's model as it was between steps."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class EagerDecoding:
    """`reformer.sampling.CachedDecoding` over an `IncrementalDecoder`: numpy ids in, numpy logits out, the
    cache kept as tensors on the model's device."""

    def __init__(self, model: ReformerModelWithLMHead, device: torch.device):
        self.decoder = IncrementalDecoder(model)
        self.device = device
        self.vocab_size = model.config.vocab_size
        self.max_length = model.config.max_position_embeddings
        self.max_length_name = "max_position_embeddings"
        self.cache_tensors = cache_layout(model.config)

    def next_token_logits(self, kind: str, input_ids: np.ndarray, past: list) -> tuple[np.ndarray, list]:
        ids = torch.from_numpy(input_ids).to(self.device)
        with evaluating(self.decoder.model):
            if kind == "prefill":
                logits, cache = self.decoder.prefill(ids)
            else:
                logits, cache = self.decoder.step(ids, DecoderCache.from_tensors(self.decoder.config, tuple(past)))
        return logits[:, -1].float().cpu().numpy(), list(cache.tensors())

    def cache_to_host(self, cache: list) -> list[np.ndarray]:
        return [tensor.cpu().numpy() for tensor in cache]

    def cache_from_host(self, arrays: list[np.ndarray]) -> list:
        return [torch.from_numpy(array).to(self.device) for array in arrays]


def stream(model: ReformerModelWithLMHead, input_ids, max_new_tokens: int, use_cache: bool = True, attention_mask=None,
           **options) -> Iterator[torch.Tensor]:
    """The new tokens as they come: one int64 tensor B per step, on the device of input_ids (of the model for a
    list); arguments as for `generate`, checked at once. Stopping the iteration stops generation."""
    prompts, choose, decoding = start_generation(model, input_ids, attention_mask, options)
    return tensors_on(decoding.device, generation_steps(decoding, prompts, choose, max_new_tokens, use_cache))


@torch.no_grad()
def tensors_on(device: torch.device, steps: Iterator[np.ndarray]) -> Iterator[torch.Tensor]:
    for tokens in steps:
        yield torch.from_numpy(tokens).to(device)


@torch.no_grad()
def generate(model: ReformerModelWithLMHead, input_ids, max_new_tokens: int, use_cache: bool = True,
             attention_mask=None, **options) -> torch.Tensor:
    """The prompts followed by up to `max_new_tokens` new tokens: int64 B, T + new tokens.

    input_ids: an int tensor B, T, left-padded where `attention_mask` (B, T, 1 for prompt tokens) has zeros,
    as transformers takes a batch of prompts of different lengths, or a list of token-id lists of any lengths
    (left-padded for you with the pad token). Each row's new tokens are those of generating it alone (up to
    sampling, which draws for all rows from one generator).
    options (`reformer.sampling.TokenChooser`): do_sample (default greedy), temperature, top_k, top_p, seed,
    repetition_penalty, eos_token_id (a row that produced it continues with pad_token_id, by default
    `config.pad_token_id`; generation stops early when every row has), pad_token_id.
    use_cache False: every step reruns the whole sequence (the reference's `use_cache=False`)."""
    prompts, choose, decoding = start_generation(model, input_ids, attention_mask, options)
    steps = list(generation_steps(decoding, prompts, choose, max_new_tokens, use_cache))
    return torch.from_numpy(np.concatenate([prompts.ids, np.stack(steps, axis=1)], axis=1)).to(decoding.device)


def generate_text(model: ReformerModelWithLMHead, tokenizer: Tokenizer | None, prompts, max_new_tokens: int,
                  **options) -> str | list[str]:
    """Text in, text out: each prompt (a text, or a list of texts of any lengths) followed by up to
    `max_new_tokens` generated tokens' text, up to the `eos_token_id` where given; options as for `generate`.
    tokenizer: the checkpoint's, `reformer.tokenizer.load_tokenizer(directory, model.config.vocab_size)`."""
    return text_generation(functools.partial(generate, model), tokenizer, prompts, max_new_tokens, options)


def start_generation(model: ReformerModelWithLMHead, input_ids, attention_mask, options: dict
                     ) -> tuple[Prompts, TokenChooser, EagerDecoding]:
    """The prompts, token chooser and decoding of one `generate` or `stream` call. The model runs in eval mode
    (no dropout) and is left in its own mode."""
    device = input_ids.device if isinstance(input_ids, torch.Tensor) else next(model.parameters()).device
    host = lambda value: value.cpu().numpy() if isinstance(value, torch.Tensor) else value  # noqa: E731
    choose = TokenChooser.from_options(options, model.config.pad_token_id)
    prompts = Prompts.from_inputs(host(input_ids), host(attention_mask), choose.pad_token_id)
    return prompts, choose, EagerDecoding(model, device)
