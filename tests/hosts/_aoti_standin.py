"""A stand-in for the decoder packages of exporters/decoder.py (`export_causal_lm_with_past(..., "aoti")`, written
on another branch) until they are merged: decoder.pt2 with the models "prefill" and "step", compiled by
exporters.aoti.compile_package from the same graphs as the ONNX decoder, with decoder_config.json as each
model's metadata. To be deleted when the real exporter lands."""

from __future__ import annotations

import json
import os

import torch
from torch.export import Dim

from exporters import decoder as decoder_export
from exporters.aoti import PORTABLE_MARCH, compile_package
from exporters.decoder import CONFIG_NAME, DecoderGraphs, StepGraph, decoder_description, example_prompt
from exporters.program import batch_dim, export_dynamic
from exporters.specs import resolve_max_length
from reformer.generation import IncrementalDecoder
from reformer.sampling import PAST_LENGTH


def export_causal_lm_with_past(model, output_dir: str, fmt: str, verify: bool = False) -> None:
    if fmt != "aoti":
        decoder_export.export_causal_lm_with_past(model, output_dir, fmt, verify=verify)
        return
    os.makedirs(output_dir)
    config = model.config
    max_length = resolve_max_length(config, None)
    with torch.no_grad():
        decoder = IncrementalDecoder(model)
        description = {**decoder_description(config, "torchscript", max_length), "format": "aoti"}
        prompt = example_prompt(config, max_length)
        _, cache = decoder.prefill(prompt)
        batch = batch_dim()
        past_length = Dim(PAST_LENGTH, min=1, max=max_length - 1)
        past_axes = [{axis: batch if size == "batch_size" else past_length
                      for axis, size in enumerate(tensor["shape"]) if size in ("batch_size", PAST_LENGTH)}
                     for tensor in map(description["cache_tensors"].get, description["cache"])]
        programs = {
            "prefill": export_dynamic(DecoderGraphs(decoder), (prompt,),
                                      ({0: batch, 1: Dim("prompt_length", min=1, max=max_length)},)),
            "step": export_dynamic(StepGraph(decoder), (prompt[:, -1:].clone(), *cache.tensors()),
                                   ({0: batch}, tuple(past_axes))),
        }
        compile_package(os.path.join(output_dir, "decoder.pt2"), programs, {CONFIG_NAME: json.dumps(description)},
                        PORTABLE_MARCH)
