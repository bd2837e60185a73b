"""The causal-lm-with-past directory (layout: exporters/decoder.py): its file names, and its graphs loaded for
Python. The exporter writes these names and the verifier reads them, so they live here, apart from both."""

from __future__ import annotations

import os

import torch

from reformer.runtime import DECODER_CONFIG_NAME

CONFIG_NAME = DECODER_CONFIG_NAME  # the runtime reads it; one name for both sides
FILES = {"onnx": {"prefill": "prefill.onnx", "step": "decoder_step.onnx"}, "aoti": {"package": "decoder.pt2"},
         "torchscript": {"module": "decoder.pt"}}
GRAPHS = ("prefill", "step")  # also the model names in the AOTInductor package


def load_graphs(folder: str, fmt: str):
    """run(kind, input_ids, past) -> (logits, present) over the graphs in folder, torch tensors in and out (CPU)."""
    if fmt == "aoti":
        from .aoti import load_package

        path = os.path.join(folder, FILES["aoti"]["package"])
        models = {kind: load_package(path, kind) for kind in GRAPHS}

        def run(kind, input_ids, past):
            with torch.no_grad():
                outputs = models[kind](input_ids, *past)
            return outputs[0], list(outputs[1:])
        return run

    if fmt == "torchscript":
        from .torchscript import legacy_jit

        with legacy_jit():
            module = torch.jit.load(os.path.join(folder, FILES["torchscript"]["module"]), map_location="cpu")

        def run(kind, input_ids, past):
            method = module.forward if kind == "prefill" else module.step
            with torch.no_grad():
                outputs = method(input_ids, *past)
            return outputs[0], list(outputs[1:])
        return run

    from reformer.runtime import CPU, OnnxGenerator

    generator = OnnxGenerator(folder, providers=[CPU], io_binding=False)

    def run(kind, input_ids, past):
        logits, present = generator.run(kind, input_ids.numpy(), [tensor.numpy() for tensor in past])
        return torch.from_numpy(logits), [torch.from_numpy(tensor) for tensor in present]
    return run
