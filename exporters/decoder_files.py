"""The causal-lm-with-past directory (layout: exporters/decoder.py): its file names, and its graphs loaded for
Python as exporters.runners.Runner, as the task graphs are. The exporter writes these names and the verifier
reads them, so they live here, apart from both."""

from __future__ import annotations

import os

import torch

from reformer.runtime import DECODER_CONFIG_NAME

from .runners import Runner, callable_runner

CONFIG_NAME = DECODER_CONFIG_NAME  # the runtime reads it; one name for both sides
FILES = {"onnx": {"prefill": "prefill.onnx", "step": "decoder_step.onnx"}, "aoti": {"package": "decoder.pt2"},
         "torchscript": {"module": "decoder.pt"}}
GRAPHS = ("prefill", "step")  # also the model names in the AOTInductor package


def load_graphs(folder: str, fmt: str):
    """run(kind, input_ids, past) -> (logits, present) over the graphs in folder, torch tensors in and out (CPU)."""
    graphs = graph_runners(folder, fmt)

    def run(kind, input_ids, past):
        logits, *present = graphs[kind].run([input_ids, *past])
        return logits, present
    return run


def graph_runners(folder: str, fmt: str) -> dict[str, Runner]:
    """The prefill and step graphs in folder as Runners on the CPU: [input_ids, *past] -> [logits, *present]."""
    if fmt == "aoti":
        from .aoti import load_package

        path = os.path.join(folder, FILES["aoti"]["package"])
        return {kind: callable_runner(load_package(path, kind), "cpu") for kind in GRAPHS}
    if fmt == "torchscript":
        from .torchscript import legacy_jit

        with legacy_jit():
            module = torch.jit.load(os.path.join(folder, FILES["torchscript"]["module"]), map_location="cpu")
        return {"prefill": callable_runner(module.forward, "cpu"), "step": callable_runner(module.step, "cpu")}
    from reformer.runtime import CPU, OnnxGenerator

    generator = OnnxGenerator(folder, providers=[CPU], io_binding=False)

    def onnx_runner(kind: str) -> Runner:
        def run(inputs):
            logits, present = generator.run(kind, inputs[0].numpy(), [tensor.numpy() for tensor in inputs[1:]])
            return [torch.from_numpy(logits), *map(torch.from_numpy, present)]
        return Runner(run, "cpu")

    return {kind: onnx_runner(kind) for kind in GRAPHS}
