"""Triton Inference Server model repositories (`reformer-export --format triton --output REPO`), a layout step
over a finished export: exporters.api exports and verifies the task's graph as for `--format onnx` or
`torchscript` into a staging folder beside the repository (`repository_staging`, `staged_graph_path`), then
`publish_repository` lays it out with a `config.pbtxt` built from the graph's own description (its inputs and
outputs, their dtypes and dims, what it records about itself) and renames the whole repository into place.

    REPO/<model>-<task>/config.pbtxt
    REPO/<model>-<task>/1/model.onnx    backend onnxruntime, and python (beside model.py); a folder holding
                                        the graph and its external data when it has any
    REPO/<model>-<task>/1/model.pt      backend pytorch (TorchScript)
    REPO/<model>-<task>/1/model.py      backend python: exporters.triton.backend through reformer.runtime
    REPO/<model>-causal-lm-with-past/1/graphs/   task causal-lm-with-past: the prefill and step graphs, served
                                        by a python-backend generation loop (model.py), with the
                                        checkpoint's tokenizer files (exporters/tokenizer_files.py; a task
                                        graph carries them in its metadata)

Every config.pbtxt is parsed with Triton's own schema (`tritonclient.grpc.model_config_pb2`) before anything
is written: a field or enum Triton does not know fails the export. The Python backend is the default: it is
the one that checks requests (ids inside the vocabulary, the export's maximum length), batches requests of
different lengths without changing an answer (see exporters.triton.backend), generates, and runs on the server
binary of the `serve` extra (which ships no ONNX Runtime or PyTorch backend; those run in NVIDIA's images)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np

from reformer.files import publish, staging_folder

from ..choices import DEFAULT_TRITON_BACKEND, TRITON_BACKENDS
from ..errors import ExportError
from .backend import GENERATION_GRAPHS, GENERATION_OPTIONS, TASK_GRAPH
from .server import PYTHONPATH_VARIABLE

# Requests the server may batch into one run; each request may itself hold several rows.
MAX_BATCH_SIZE = 16
# How long the dynamic batcher holds a request for others to join it: 1 ms, well under one forward (~10 ms).
MAX_QUEUE_DELAY_MICROSECONDS = 1000
VERSION = "1"
CONFIG_NAME = "config.pbtxt"
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                "bool": "TYPE_BOOL"}
ONNX_TYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool"}  # onnx.TensorProto's numbers
GENERATION_OUTPUT = "output_ids"
MODEL_PY = '''"""Triton Python-backend model written by reformer-export: {what}, through reformer.runtime."""

import os
import site
import sys


def use_environment_paths():
    """Put the package folders named in {variable} (exporters.triton.server sets it to the serving environment's)
    in front of sys.path: the backend's stub runs the system's Python, whose sys.path lacks them."""
    before = list(sys.path)
    for folder in os.environ.get("{variable}", "").split(os.pathsep):
        if folder and os.path.isdir(folder):
            site.addsitedir(folder)  # also runs the folder's .pth files (editable installs)
    sys.path[:] = [path for path in sys.path if path not in before] + before


use_environment_paths()

from exporters.triton.backend import {model_class} as TritonPythonModel  # noqa: E402,F401
'''


class TritonExportError(ExportError):
    """A repository that cannot be written (missing tritonclient, a backend the task cannot use, a config
    Triton would refuse)."""


@dataclass(frozen=True)
class Tensor:
    """One input or output as config.pbtxt describes it: dims without the batch axis, -1 where dynamic."""

    name: str
    dtype: str  # numpy name: float32, int64, ...
    dims: tuple[int, ...]
    optional: bool = False
    ragged: bool = False  # requests of different dims may share a batch (the Python backend runs each its own way)

    def text(self) -> str:
        fields = [f'name: "{self.name}"', f"data_type: {TRITON_TYPES[self.dtype]}",
                  f"dims: [ {', '.join(str(dim) for dim in self.dims)} ]"]
        if self.optional:
            fields.append("optional: true")
        if self.ragged:
            fields.append("allow_ragged_batch: true")
        return "  {\n" + "".join(f"    {field}\n" for field in fields) + "  }"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    backend: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    device: str  # cpu or cuda: the instance group's kind
    parameters: tuple[tuple[str, str], ...] = ()
    max_batch_size: int = MAX_BATCH_SIZE
    dynamic_batching: bool = True

    def text(self) -> str:
        lines = [f'name: "{self.name}"', f'backend: "{self.backend}"', f"max_batch_size: {self.max_batch_size}",
                 "input [\n" + ",\n".join(tensor.text() for tensor in self.inputs) + "\n]",
                 "output [\n" + ",\n".join(tensor.text() for tensor in self.outputs) + "\n]",
                 f"instance_group [ {{ kind: {'KIND_GPU' if self.device == 'cuda' else 'KIND_CPU'} count: 1 }} ]"]
        if self.dynamic_batching:
            lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {MAX_QUEUE_DELAY_MICROSECONDS} }}")
        lines += [f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}'
                  for key, value in self.parameters]
        return "\n".join(lines) + "\n"


def parse_config(text: str):
    """The config parsed with Triton's schema (a model_config_pb2.ModelConfig); TritonExportError when Triton
    would refuse it."""
    from google.protobuf import text_format

    model_config_pb2 = triton_schema()
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise TritonExportError(f"config.pbtxt does not parse with Triton's schema: {error}") from None


def triton_schema():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise TritonExportError("--format triton checks each config.pbtxt with tritonclient, which is not "
                                "installed: pip install 'reformer-export[serve]'") from None
    return model_config_pb2


def check_triton_options(backend: str | None, task: str | None, generation: bool) -> str:
    """The graph format the repository's backend takes (backend None: DEFAULT_TRITON_BACKEND); TritonExportError
    for a backend the task cannot use or without tritonclient. generation: the task is served by a generation
    loop (exporters.api's causal-lm-with-past)."""
    backend = backend or DEFAULT_TRITON_BACKEND
    if backend not in TRITON_BACKENDS:
        raise TritonExportError(f"unknown Triton backend {backend!r}: choose one of {', '.join(TRITON_BACKENDS)}")
    if generation and backend != "python":
        raise TritonExportError(f"task {task} is served by a Python-backend generation loop: use "
                                "--triton-backend python")
    triton_schema()
    return TRITON_BACKENDS[backend]


@contextlib.contextmanager
def repository_staging(repository: str) -> Iterator[str]:
    """reformer.files.staging_folder beside a repository that must not exist yet (TritonExportError when it
    does): the graph export and the layout both write there, so nothing reaches the repository's path but the
    whole repository."""
    if os.path.exists(repository):
        raise TritonExportError(f"output {repository} already exists: give a new directory for the repository")
    with staging_folder(repository) as staging:
        yield staging


def staged_graph_path(staging: str, backend: str, generation: bool) -> str:
    """Where the export writes in the staging folder: the causal-lm-with-past directory, or the task graph in a
    folder of its own (made here), so that external data written beside it move with it."""
    if generation:
        return os.path.join(staging, GENERATION_GRAPHS)
    folder = os.path.join(staging, "graph")
    os.mkdir(folder)
    return os.path.join(folder, TASK_GRAPH if backend != "pytorch" else "model.pt")


def publish_repository(staging: str, graph: str, repository: str, backend: str, device: str,
                       generation: bool) -> tuple[int, str]:
    """The layout step: the repository built in the staging folder around the finished graph(s) at `graph`
    (staged_graph_path) and renamed into place whole. Returns (its size in bytes, a note for the user)."""
    root = os.path.join(staging, "repository")
    config = (generation_config if generation else task_config)(graph, backend, device)
    lay_out(root, config, graph, generation)
    size_bytes = folder_size(root)
    publish(root, repository)
    return size_bytes, (f"Triton model {config.name}: backend {backend}, max batch {config.max_batch_size}, dynamic "
                        f"batching (max queue delay {MAX_QUEUE_DELAY_MICROSECONDS} µs), one "
                        f"{'GPU' if device == 'cuda' else 'CPU'} instance; serve it with reformer-serve {repository}")


def lay_out(root: str, config: ModelConfig, graph: str, generation: bool) -> None:
    """The model's folder under root: config.pbtxt (parsed first), the graph in the version folder, model.py."""
    text = config.text()
    parse_config(text)
    version = os.path.join(root, config.name, VERSION)
    os.makedirs(version)
    with open(os.path.join(root, config.name, CONFIG_NAME), "w", encoding="utf-8") as handle:
        handle.write(text)
    if generation:
        shutil.move(graph, os.path.join(version, GENERATION_GRAPHS))
    else:
        files = os.listdir(os.path.dirname(graph))
        # One file, or the folder form (Triton's, for a graph with external data) under the graph's own name.
        source = graph if files == [os.path.basename(graph)] else os.path.dirname(graph)
        shutil.move(source, os.path.join(version, os.path.basename(graph)))
    if config.backend == "python":
        what = "generation over the prefill and step graphs" if generation else "the exported task graph"
        model_class = "GenerationModel" if generation else "TaskModel"
        with open(os.path.join(version, "model.py"), "w", encoding="utf-8") as handle:
            handle.write(MODEL_PY.format(what=what, model_class=model_class, variable=PYTHONPATH_VARIABLE))


def task_config(graph: str, backend: str, device: str) -> ModelConfig:
    """The task graph's config: its inputs and outputs as the graph describes them (attention_mask optional on
    the Python backend, which fills it with ones)."""
    description, inputs, outputs = (torchscript_tensors if backend == "pytorch" else onnx_tensors)(graph)
    if backend == "python":
        inputs = tuple(replace(tensor, optional=tensor.name == "attention_mask", ragged=True) for tensor in inputs)
    parameters = (("vocab_size", description["vocab_size"]), ("max_length", description["max_length"]))
    return ModelConfig(f"{description['model_name']}-{description['task']}", backend, inputs, outputs, device,
                       tuple((key, str(value)) for key, value in parameters))


def generation_config(graphs: str, backend: str, device: str) -> ModelConfig:
    """The generation model's config: prompts and options in, new tokens out (exporters.triton.backend)."""
    with open(os.path.join(graphs, "decoder_config.json"), encoding="utf-8") as handle:
        description = json.load(handle)
    options = tuple(Tensor(name, np.dtype(dtype).name, (1,), optional=True)
                    for name, dtype in GENERATION_OPTIONS.items())
    inputs = (Tensor("input_ids", "int64", (-1,), ragged=True), Tensor("max_new_tokens", "int32", (1,))) + options
    parameters = (("vocab_size", str(description["vocab_size"])), ("max_length", str(description["max_length"])))
    return ModelConfig(f"{description['model_name']}-causal-lm-with-past", backend, inputs,
                       (Tensor(GENERATION_OUTPUT, "int64", (-1,)),), device, parameters)


def onnx_tensors(path: str) -> tuple[dict, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(what the graph records about itself, its inputs, its outputs) from the ONNX file's metadata and value
    infos; the first axis must be the dynamic batch axis (it is left out of dims)."""
    import onnx

    from ..specs import METADATA_PREFIX

    model = onnx.load(path, load_external_data=False)
    description = {prop.key.removeprefix(METADATA_PREFIX): json_or_text(prop.value) for prop in model.metadata_props}

    def tensors(values) -> tuple[Tensor, ...]:
        described = []
        for value in values:
            shape = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in value.type.tensor_type.shape.dim]
            if not shape or shape[0] != -1:
                raise TritonExportError(f"{value.name} has no dynamic batch axis first: Triton batching needs one")
            described.append(Tensor(value.name, ONNX_TYPES[value.type.tensor_type.elem_type], tuple(shape[1:])))
        return tuple(described)

    return description, tensors(model.graph.input), tensors(model.graph.output)


def torchscript_tensors(path: str) -> tuple[dict, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(the file's embedded description, its inputs, its outputs): outputs from one run of the graph on one
    token, their dims -1 on the axes its description calls dynamic."""
    import torch

    from ..torchscript import legacy_jit, load_metadata

    description = load_metadata(path)
    with legacy_jit():
        module = torch.jit.load(path, map_location="cpu")
    example = torch.ones(1, 1, dtype=torch.long)
    with torch.no_grad():
        outputs = module(example, example)
    inputs = tuple(Tensor(name, "int64", (-1,)) for name in description["input_names"])
    described = []
    for name, output in zip(description["output_names"], outputs):
        dynamic = {int(axis) for axis in description["dynamic_axes"][name]}
        dims = tuple(-1 if axis in dynamic else size for axis, size in enumerate(output.shape))
        described.append(Tensor(name, str(output.dtype).removeprefix("torch."), dims[1:]))
    return description, inputs, tuple(described)


def json_or_text(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def folder_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(path, name)) for path, _, names in os.walk(folder) for name in names)

