"""The two graphs of causal-lm-with-past (exporters.decoder): their specs (exporters.specs.GraphSpec: names,
named dynamic axes, example inputs), built from the cache layout (reformer.generation.cache_layout), and the
torch modules over `reformer.generation.IncrementalDecoder` that every format's exporter of them traces
(exporters.onnx, aoti, torchscript: `export_decoder`). decoder_config.json lists the specs' names."""

from __future__ import annotations

import torch
from torch import nn

from reformer.generation import DecoderCache, IncrementalDecoder, cache_layout
from reformer.sampling import PAST_LENGTH

from .specs import BATCH_RANGE, BATCH_SIZE, INPUT_IDS, GraphSpec, example_length

# The graphs of causal-lm-with-past: the names of their files' roles, the models of an AOTInductor package.
GRAPHS = ("prefill", "step")
LOGITS = "logits"
PROMPT_LENGTH = "prompt_length"
# The cache tensors' names as graph inputs (the step's past) and outputs (both graphs' present).
PAST_PREFIX = "past_"
PRESENT_PREFIX = "present_"


def prefill_outputs(decoder: IncrementalDecoder, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(logits, *cache tensors) of the prompt."""
    logits, cache = decoder.prefill(input_ids)
    return (logits, *cache.tensors())


def step_outputs(decoder: IncrementalDecoder, input_ids: torch.Tensor, past: tuple) -> tuple[torch.Tensor, ...]:
    """(logits, *present cache tensors) of one new token after the past cache tensors."""
    logits, cache = decoder.step(input_ids, DecoderCache.from_tensors(decoder.config, past))
    return (logits, *cache.tensors())


class StepGraph(nn.Module):
    """The decoder step as `forward`, for exporters that take one method (torch.export)."""

    def __init__(self, decoder: IncrementalDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return step_outputs(self.decoder, input_ids, past)


class DecoderGraphs(nn.Module):
    """`forward` is the prefill, `step` the decoder step: one TorchScript file for C++ hosts holds both, and
    the ONNX prefill graph is this module's `forward`."""

    def __init__(self, decoder: IncrementalDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return prefill_outputs(self.decoder, input_ids)

    def step(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return step_outputs(self.decoder, input_ids, past)


def graph_modules(decoder: IncrementalDecoder) -> dict[str, nn.Module]:
    """The module torch.export traces for each graph: the prefill as DecoderGraphs' forward, the step as
    StepGraph's."""
    return {"prefill": DecoderGraphs(decoder), "step": StepGraph(decoder)}


def example_prompt_length(config, max_length: int) -> int:
    """The traced prompt's length: longer than one chunk and not a multiple of the chunk lengths (the general
    prefill path), short enough for a step after it."""
    return example_length(config.padding_multiple, max_length - 1)


def example_prompt(config, max_length: int, batch: int = 2) -> torch.Tensor:
    """A prompt of example_prompt_length."""
    length = example_prompt_length(config, max_length)
    return torch.randint(1, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


def cache_axes(config) -> dict[str, dict[int, str]]:
    """The named axes of every cache tensor, in cache order: those cache_layout's shapes name (batch_size, and
    PAST_LENGTH for the positions)."""
    return {name: {axis: dim for axis, dim in enumerate(tensor["shape"]) if isinstance(dim, str)}
            for name, tensor in cache_layout(config).items()}


def decoder_specs(decoder: IncrementalDecoder, max_length: int) -> dict[str, GraphSpec]:
    """The prefill's and the step's spec. Prefill: input_ids [batch, prompt_length] (1 to max_length) -> logits
    and the present cache, whose positions are the prompt's. Step: input_ids [batch, 1] and the past cache
    (past_length positions, 1 to max_length - 1) -> logits and the present cache, whose past_length + 1
    positions are no dimension of their own. Traced at example_prompt and the step after it. (Their ONNX
    graphs' dimensions keep torch.export's symbol names, s0, s1, ...: runtimes take the cache's axes from
    decoder_config.json.)"""
    config, batch = decoder.config, {0: BATCH_SIZE}
    cache = cache_axes(config)
    present_names = tuple(PRESENT_PREFIX + name for name in cache)
    past_names = tuple(PAST_PREFIX + name for name in cache)
    prompt_axes = {**batch, 1: PROMPT_LENGTH}
    prefill_axes = {INPUT_IDS: prompt_axes, LOGITS: prompt_axes, **{
        present: {axis: PROMPT_LENGTH if dim == PAST_LENGTH else dim for axis, dim in axes.items()}
        for present, axes in zip(present_names, cache.values())}}
    step_axes = {INPUT_IDS: batch, **dict(zip(past_names, cache.values())), LOGITS: batch, **{
        present: {axis: dim for axis, dim in axes.items() if dim != PAST_LENGTH}
        for present, axes in zip(present_names, cache.values())}}
    prompt = example_prompt(config, max_length)
    with torch.no_grad():
        _, prompt_cache = decoder.prefill(prompt)
    return {
        "prefill": GraphSpec((INPUT_IDS,), (LOGITS, *present_names), prefill_axes,
                             {BATCH_SIZE: BATCH_RANGE, PROMPT_LENGTH: (1, max_length)}, (prompt,)),
        "step": GraphSpec((INPUT_IDS, *past_names), (LOGITS, *present_names), step_axes,
                          {BATCH_SIZE: BATCH_RANGE, PAST_LENGTH: (1, max_length - 1)},
                          (prompt[:, -1:].clone(), *prompt_cache.tensors()), ("past", PAST_PREFIX)),
    }
