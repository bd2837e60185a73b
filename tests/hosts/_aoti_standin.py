"""A stand-in for the AOTInductor exporter (exporters/aoti.py, written on another branch) until it is merged:
the same wrappers, exported with torch.export and compiled with AOTInductor, and the same descriptions as the
TorchScript files, under the same names, as package metadata. To be deleted when the real exporter lands."""

from __future__ import annotations

import json
import os

import torch
from torch._inductor.package import package_aoti
from torch.export import Dim

from exporters import decoder as decoder_export
from exporters.decoder import DecoderGraphs, StepGraph, decoder_description, example_prompt
from exporters.program import batch_dim, export_dynamic, export_program
from exporters.specs import graph_description, resolve_max_length, wrapper_example_inputs
from reformer.generation import IncrementalDecoder
from reformer.sampling import PAST_LENGTH


def export_aoti(model, spec, path: str) -> None:
    """`path` (.pt2): the package's model "model" is spec.wrap(model), description under reformer_export.json."""
    config = model.config
    max_length = resolve_max_length(config, None)
    with torch.no_grad():
        wrapper = spec.wrap(model).eval()
        program = export_program(wrapper, wrapper_example_inputs(wrapper, config, max_length, "cpu"), max_length)
        description = graph_description(config, spec, max_length=max_length, dtype="fp32", with_buckets=False)
        description.update(format="aoti", config=config.to_dict())
        metadata = {"aot_inductor.metadata": {"reformer_export.json": json.dumps(description)}}
        torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=metadata)


def export_causal_lm_with_past(model, output_dir: str, fmt: str, verify: bool = False) -> None:
    """fmt "aoti": output_dir/decoder.pt2 with the models "prefill" and "step", description under
    decoder_config.json; other formats: exporters.decoder's."""
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
        graphs = (
            ("prefill", DecoderGraphs(decoder), (prompt,),
             ({0: batch, 1: Dim("prompt_length", min=1, max=max_length)},)),
            ("step", StepGraph(decoder), (prompt[:, -1:].clone(), *cache.tensors()), ({0: batch}, tuple(past_axes))),
        )
        options = {"aot_inductor.package": True,
                   "aot_inductor.metadata": {"decoder_config.json": json.dumps(description)}}
        files = {name: torch._inductor.aot_compile(export_dynamic(module, inputs, axes).module(), inputs,
                                                   options=options)
                 for name, module, inputs, axes in graphs}
        package_aoti(os.path.join(output_dir, "decoder.pt2"), files)
