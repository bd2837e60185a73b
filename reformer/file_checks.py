"""Checks of model files this process did not write, before a runtime reads them: names they give for other
files must stay inside their folder, and decoder_config.json must describe what reformer.runtime runs. numpy
and the standard library only, like reformer.runtime.

- `check_external_data(path)`: every tensor an ONNX graph keeps in external data names a file in the graph's
  folder (ONNX Runtime checks this too, in its own words and by its version's rules; this check names the file
  and holds whatever the runtime's version).
- `read_decoder_description(directory)`: decoder_config.json of a causal-lm-with-past directory, each field
  the runtime uses of the type it needs, its graph files inside the directory.
- `check_graph(session, description, kind, path)`: a graph's inputs and outputs are those decoder_config.json
  names, the step graph's cache inputs of the dtypes and shapes it describes."""

from __future__ import annotations

import json
import mmap
import os

from .sampling import DECODER_CONFIG_NAME

# ONNX's protobuf messages that can hold a tensor, by field number -> the message there (onnx.proto):
# ModelProto graph 7, training_info 20, functions 25; TrainingInfoProto initialization 1, algorithm 2;
# GraphProto node 1, initializer 5, sparse_initializer 15; NodeProto attribute 5; FunctionProto node 7,
# attribute_proto 11; AttributeProto t 5, g 6, tensors 10, graphs 11, sparse_tensor 22, sparse_tensors 23;
# SparseTensorProto values 1, indices 2; TensorProto external_data 13 (key 1, value 2).
TENSOR_HOLDERS = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "function": {7: "node", 11: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}
GRAPH_KINDS = ("prefill", "step")
# The cache dtypes decoder_config.json names, as ONNX Runtime names a graph input's type.
GRAPH_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


class ModelFileError(ValueError):
    """A model file or folder refused before any of it is run: its message names the file and the problem."""


def stays_inside(name: str) -> bool:
    """Whether a file name given inside a folder's files is a path under that folder, read as written."""
    return bool(name) and not os.path.isabs(name) and os.path.normpath(name).split(os.sep)[0] != ".."


def check_external_data(path: str | os.PathLike) -> None:
    """Raise ModelFileError unless every external-data file of the ONNX graph at `path` lies in its folder: the
    name as written, and the file it resolves to (symbolic links followed) under the folder or, for a graph
    that is itself a link (as in the Hugging Face cache), under the folder of the file it links to."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    allowed = (os.path.realpath(folder), os.path.dirname(os.path.realpath(path)))
    for location in external_data_locations(path):
        resolved = os.path.realpath(os.path.join(folder, location))
        if not stays_inside(location) or not any(is_under(resolved, root) for root in allowed):
            raise ModelFileError(f"{path} refers to external data {location!r}, which is not a file in {folder}: "
                                 "refused, nothing outside a model's folder is read")


def is_under(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def external_data_locations(path: str) -> list[str]:
    """The `location` of every tensor the ONNX file keeps in external data, read from its protobuf without
    parsing the weights (a graph without the word "location" in it has none)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return []
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(b"location") < 0:
                return []
            locations: list[str] = []
            try:
                collect_locations(data, 0, len(data), "model", locations)
            except (ValueError, IndexError, RecursionError):
                raise ModelFileError(f"{path} is not a well-formed ONNX file") from None
            return locations


def collect_locations(data, start: int, end: int, kind: str, locations: list[str]) -> None:
    """Walk the message of `kind` in data[start:end] into the messages that can hold tensors."""
    entry = {}
    for number, value_start, value_end in length_delimited_fields(data, start, end):
        if kind == "entry":
            entry[number] = bytes(data[value_start:value_end]).decode("utf-8", "replace")
        elif number in TENSOR_HOLDERS[kind]:
            collect_locations(data, value_start, value_end, TENSOR_HOLDERS[kind][number], locations)
    if entry.get(1) == "location":
        locations.append(entry.get(2, ""))


def length_delimited_fields(data, position: int, end: int):
    """(field number, start, end) of each length-delimited field of the message in data[position:end]; the
    others are skipped. ValueError where the bytes are no protobuf message (ONNX uses no groups)."""
    while position < end:
        key, position = varint(data, position)
        wire_type = key & 7
        if wire_type == 0:
            _, position = varint(data, position)
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            length, position = varint(data, position)
            if position + length > end:
                raise ValueError("a field runs past its message")
            yield key >> 3, position, position + length
            position += length
        else:
            raise ValueError(f"wire type {wire_type}")
    if position != end:
        raise ValueError("a field runs past its message")


def varint(data, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("varint over 64 bits")


def read_decoder_description(directory: str | os.PathLike) -> dict:
    """decoder_config.json of an ONNX causal-lm-with-past directory, checked (ModelFileError naming the file
    and the first problem; FileNotFoundError without one)."""
    path = os.path.join(directory, DECODER_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {DECODER_CONFIG_NAME} in {directory}: export with --task causal-lm-with-past")
    try:
        with open(path, encoding="utf-8") as handle:
            description = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path} is not valid JSON ({error})") from None
    problem = description_problem(description, directory)
    if problem:
        raise ModelFileError(f"{path}: {problem}")
    return description


def description_problem(description, directory: str) -> str | None:
    if not isinstance(description, dict):
        return "holds no JSON object"
    if description.get("format") != "onnx":
        return f"describes a {description.get('format')} export, not ONNX"
    if "max_length" not in description:
        return "no max_length: the directory was exported by an older version, export it again"
    files = description.get("files")
    if not isinstance(files, dict) or sorted(files) != sorted(GRAPH_KINDS):
        return f"'files' must name the {' and '.join(GRAPH_KINDS)} graphs, got {files!r}"
    for kind, name in files.items():
        if not isinstance(name, str) or not stays_inside(name):
            return f"the {kind} graph {name!r} is not a file in {directory}: refused"
    for key in ("vocab_size", "max_length"):
        if not is_int(description.get(key)) or description[key] < 1:
            return f"{key} must be a positive integer, got {description.get(key)!r}"
    if description.get("pad_token_id") is not None and not is_int(description["pad_token_id"]):
        return f"pad_token_id must be an integer or null, got {description['pad_token_id']!r}"
    return cache_problem(description) or names_problem(description)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def cache_problem(description: dict) -> str | None:
    cache, tensors = description.get("cache"), description.get("cache_tensors")
    if not isinstance(cache, list) or not isinstance(tensors, dict) or any(name not in tensors for name in cache):
        return "'cache' must list names that 'cache_tensors' describes"
    for name in cache:
        tensor = tensors[name]
        if not isinstance(tensor, dict) or tensor.get("dtype") not in GRAPH_TYPES:
            return f"cache tensor {name} must have a dtype of {', '.join(GRAPH_TYPES)}"
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(dim, str) or is_int(dim) and dim > 0 for dim in shape):
            return f"cache tensor {name} must have a shape of dimension names and positive sizes, got {shape!r}"
        if tensor.get("padding_value") is not None and not isinstance(tensor["padding_value"], (int, float)):
            return f"cache tensor {name} must have a number or null as padding_value"
    return None


def names_problem(description: dict) -> str | None:
    for kind in GRAPH_KINDS:
        names = description.get(kind)
        if not isinstance(names, dict) or not all(
                isinstance(names.get(side), list) and all(isinstance(name, str) for name in names[side])
                for side in ("inputs", "outputs")):
            return f"'{kind}' must list the graph's input and output names"
    if len(description["step"]["inputs"]) != 1 + len(description["cache"]):
        return "the step graph's inputs must be the token ids and one per cache tensor"
    return None


def check_graph(session, description: dict, kind: str, path: str) -> None:
    """The `kind` graph's inputs (fed by name) and outputs (read in order) are those decoder_config.json lists,
    and the step graph takes each cache tensor with the dtype and shape it describes (a named dimension where
    it names one)."""
    names = description[kind]
    inputs = sorted(graph_input.name for graph_input in session.get_inputs())
    outputs = [output.name for output in session.get_outputs()]
    if inputs != sorted(names["inputs"]) or outputs != names["outputs"]:
        raise ModelFileError(f"{path} has inputs {inputs} and outputs {outputs}; {DECODER_CONFIG_NAME} lists "
                             f"{names['inputs']} and {names['outputs']}: refused")
    if kind != "step":
        return
    graph_inputs = {graph_input.name: graph_input for graph_input in session.get_inputs()}
    for cache_name, input_name in zip(description["cache"], names["inputs"][1:]):
        tensor, graph_input = description["cache_tensors"][cache_name], graph_inputs[input_name]
        dims_match = len(graph_input.shape) == len(tensor["shape"]) and all(
            is_int(described) == isinstance(found, int) and (not is_int(described) or described == found)
            for described, found in zip(tensor["shape"], graph_input.shape))
        if graph_input.type != GRAPH_TYPES[tensor["dtype"]] or not dims_match:
            raise ModelFileError(f"{path} takes {input_name} as {graph_input.type} {graph_input.shape}; "
                                 f"{DECODER_CONFIG_NAME} describes {tensor['dtype']} {tensor['shape']}: refused")
