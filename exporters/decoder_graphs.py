"""The two graphs of causal-lm-with-past (exporters.decoder) as torch modules over
`reformer.generation.IncrementalDecoder`, with their example inputs and dynamic shapes, for every format's
exporter of them (exporters.onnx, aoti, torchscript: `export_decoder`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from reformer.generation import DecoderCache, IncrementalDecoder
from reformer.sampling import PAST_LENGTH

from .program import batch_dim
from .specs import example_length


# The graphs of causal-lm-with-past: the names of their files' roles, the models of an AOTInductor package.
GRAPHS = ("prefill", "step")


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


def example_prompt(config, max_length: int, batch: int = 2) -> torch.Tensor:
    """A prompt longer than one chunk and not a multiple of the chunk lengths (the general prefill path), short
    enough for a step after it."""
    length = example_length(config.padding_multiple, max_length - 1)
    return torch.randint(1, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


def dynamic_graphs(decoder: IncrementalDecoder, description: dict) -> list[tuple]:
    """(name, module, example inputs, dynamic shapes) of the prefill and step graphs, for torch.export."""
    config, max_length = decoder.config, description["max_length"]
    prompt = example_prompt(config, max_length)
    _, cache = decoder.prefill(prompt)
    batch = batch_dim()
    prompt_length = Dim("prompt_length", min=1, max=max_length)
    past_length = Dim(PAST_LENGTH, min=1, max=max_length - 1)
    past_axes = [{axis: batch if size == "batch_size" else past_length
                  for axis, size in enumerate(tensor["shape"]) if size in ("batch_size", PAST_LENGTH)}
                 for tensor in map(description["cache_tensors"].get, description["cache"])]
    return [
        ("prefill", DecoderGraphs(decoder), (prompt,), ({0: batch, 1: prompt_length},)),
        ("step", StepGraph(decoder), (prompt[:, -1:].clone(), *cache.tensors()), ({0: batch}, tuple(past_axes))),
    ]
