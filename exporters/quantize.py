"""`--quantize int8`: dynamic int8 quantization of an exported fp32 ONNX graph, by ONNX Runtime's own quantizer
(`onnxruntime.quantization.quantize_dynamic`), for the CPU.

Dynamic quantization stores each weight matrix as int8 with one scale (per tensor) or one per output column
(per channel), and quantizes the activation that meets
it to uint8 at run time, per call, from its own range; the product runs as an integer kernel (VNNI on CPUs
that have it) and is scaled back to float. Embedding tables are stored as int8 too and dequantized on lookup.
Products of two activations (the attention's query-key and weights-value products) stay fp32, and so does
everything that is not a product or a lookup.

Which products are quantized, and how, is a recipe (RECIPES), measured on models/byte-lm (bits per byte over
1,024-byte windows of the held-out random.py, top-1 agreement at every position) and the benchmarks' `small`
model (4,096 tokens, onnxruntime 1.32, AMD EPYC, interleaved runs, median):
- EVERY_PRODUCT, weights per tensor, the default: `small` int8 1.86-1.89x fp32 with 1 thread, 1.61-1.69x with 2.
  On byte-lm top-1 agreement with fp32 is 97.5%: its LSH layers hash the int8 error of the layers before them,
  and a moved bucket changes what a token attends to.
- FIRST_LAYER_FP32, for a model whose held-out text shows EVERY_PRODUCT below the task verdict's top-1 bound
  (exporters.task_verdict.TOP1_AGREEMENT_BOUND, at every position; quantize_for_text): the first layer's
  products stay fp32, the others' 2-D weights are per output channel. byte-lm: 98.85% agreement, file 42.9% of
  fp32's (29.0% with every product). Neither change alone reaches the bound: per channel everywhere 98.05%,
  the first layer fp32 per tensor 98.44%. Fewer of the first layer's products fp32 gave 98.13-98.52%, and any
  one product of another layer fp32 moved agreement by 0.3% at most. Its cost on `small`: 1.70x with 1 thread
  and 1.44x with 2 (first layer fp32 and per channel, one run); per channel alone 1.86x and 1.56x.
  A decoder step graph takes the recipe its prefill graph chose, but quantizes the first layer's projections of
  the cached states (cached_state_products) too: each step re-projects every cached key slot, and in fp32 they
  held byte-lm's int8 decoder at 1.27-1.30x fp32 against 1.36x. Its step graph's top-1 agreement with fp32's,
  teacher-forced over the held-out text (64-token prompts, then each true next token, 192-token windows):
  99.01% so, 99.22% with them fp32, 98.25% with every product int8.

In every recipe the LSH hashing projections (every product whose result reaches an ArgMax) stay fp32. A bucket
is a discrete decision: quantizing the projection moves tokens to other buckets by more than any rounding, and
the projection is a few columns per head (no measurable time). The output head is quantized: on the first
byte-lm (3.45 bits per byte) fp32 there kept top-1 at 99.42% against 99.20%, for files 16% larger.

Per-head projection weights (3-D: heads, hidden, head size) stay per tensor: ONNX Runtime's
MatMulIntegerToFloat refuses their per-channel zero points at run time ("b zero point is not valid")."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch

from .errors import ExportError, first_line
from .onnx_files import data_file_name, needs_external_data
from .specs import INPUT_NAMES, METADATA_PREFIX

# Graph metadata key (with exporters.specs.METADATA_PREFIX) of the description quantize_onnx returns.
QUANTIZATION_KEY = "quantization"
PRODUCTS = ("MatMul", "Gemm")
INTEGER_PRODUCTS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
# How far (in nodes) from a product to the ArgMax that reads it: the hashing reshapes and concatenates the
# rotated vectors between the two, nothing more.
HASHING_REACH = 8
# The first layer's attention and feed-forward each start with a LayerNormalization.
FIRST_LAYER_NORMS = 2


@dataclass(frozen=True)
class Recipe:
    """Which weighted products quantize_onnx leaves fp32 besides the hashing, and how it scales the others."""

    name: str
    first_layer_fp32: bool
    per_channel: bool  # 2-D weights only: per-head (3-D) weights stay per tensor

    @property
    def weights(self) -> str:
        return "int8, symmetric, " + ("per output channel (per-head weights per tensor)" if self.per_channel
                                      else "per tensor")

    @property
    def summary(self) -> str:
        return "per channel, first layer fp32" if self.first_layer_fp32 else "per tensor"


EVERY_PRODUCT = Recipe("every product", first_layer_fp32=False, per_channel=False)
FIRST_LAYER_FP32 = Recipe("first layer fp32", first_layer_fp32=True, per_channel=True)
RECIPES = {recipe.name: recipe for recipe in (EVERY_PRODUCT, FIRST_LAYER_FP32)}  # the order quantize_for_text tries


def quantize_onnx(source: str | os.PathLike, destination: str | os.PathLike, recipe: Recipe = EVERY_PRODUCT) -> dict:
    """Write the dynamic int8 quantization of the fp32 graph `source` by `recipe` to `destination`, with the
    graph's metadata and the description returned (also recorded: record_description); with a data file
    beside it (exporters.onnx_files) only where the source has one and the int8 weights still need it. Raises
    ExportError with a one-line message."""
    source, destination = Path(source), Path(destination)
    graph = onnx.load(source, load_external_data=False)
    kept_fp32 = hashing_products(graph)
    if recipe.first_layer_fp32:
        cached_state = cached_state_products(graph)
        kept_fp32 += [name for name in first_layer_products(graph) if name not in cached_state]
    external_data = any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in graph.graph.initializer)
    try:
        with quiet_quantizer():
            run_quantizer(source, destination, recipe, kept_fp32, per_head_products(graph), external_data)
    except Exception as error:  # the quantizer raises many kinds; the caller needs one, with the reason
        raise ExportError(f"int8 quantization failed: {type(error).__name__}: {first_line(error)}") from error
    # The quantizer keeps the source's data file form; int8 weights a quarter the size may fit in one file.
    data_file = destination.with_name(data_file_name(destination.name))
    one_file = external_data and data_file.exists() and not needs_external_data(data_file.stat().st_size)
    quantized = onnx.load(destination, load_external_data=one_file)
    description = {
        "scheme": "int8 dynamic (onnxruntime.quantization.quantize_dynamic)",
        "recipe": recipe.name,
        "weights": recipe.weights,
        "activations": "uint8, per tensor, range computed at run time",
        "quantized_products": sum(node.op_type in INTEGER_PRODUCTS for node in quantized.graph.node),
        "fp32_products": len(kept_fp32),
        "fp32": "LSH hashing projections; products of two activations (attention)"
                + ("; the first layer's products but its projections of cached states" if recipe.first_layer_fp32
                   else ""),
        "onnxruntime": importlib.metadata.version(onnxruntime_distribution()),
    }
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(graph.metadata_props)  # the fp32 export's
    record_description(quantized, description)
    # Loaded without external data unless one_file, so weights the quantizer wrote to a data file stay there.
    destination.write_bytes(quantized.SerializeToString())
    if one_file:
        data_file.unlink()
    return description


def run_quantizer(source: Path, destination: Path, recipe: Recipe, kept_fp32: list[str], per_head: list[str],
                  external_data: bool) -> None:
    """ONNX Runtime's quantize_dynamic by `recipe`: per channel, in two passes, since it refuses per-channel
    scales on per-head weights (the second pass quantizes those per tensor)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer turns each Gemm into a MatMul named after it before it reads the names to exclude.
    excluded = kept_fp32 + [name + "_MatMul" for name in kept_fp32]
    options = dict(weight_type=QuantType.QInt8, use_external_data_format=external_data)
    per_tensor_afterwards = [name for name in per_head if name not in kept_fp32] if recipe.per_channel else []
    if not per_tensor_afterwards:
        quantize_dynamic(source, destination, per_channel=recipe.per_channel, nodes_to_exclude=excluded, **options)
        return
    with tempfile.TemporaryDirectory(prefix="per-channel-", dir=destination.parent) as scratch:
        per_channel = Path(scratch) / destination.name
        quantize_dynamic(source, per_channel, per_channel=True, nodes_to_exclude=excluded + per_head, **options)
        quantize_dynamic(per_channel, destination, per_channel=False, nodes_to_quantize=per_tensor_afterwards,
                         **options)


def quantize_for_text(source: str | os.PathLike, destination: str | os.PathLike, windows: torch.Tensor) -> dict:
    """quantize_onnx by the first of RECIPES whose top-1 agreement with the fp32 graph `source` at every
    position of the held-out `windows` (W, L token ids; an LM head's graph) reaches the task verdict's bound,
    else by the last. The description records each tried recipe's agreement."""
    from .task_verdict import TOP1_AGREEMENT_BOUND

    fp32_choices = top1_choices(source, windows)
    agreements = {}
    for recipe in RECIPES.values():
        description = quantize_onnx(source, destination, recipe)
        agreements[recipe.name] = float(np.mean(top1_choices(destination, windows) == fp32_choices))
        if agreements[recipe.name] >= TOP1_AGREEMENT_BOUND:
            break
    description["held_out_top1_agreement"] = agreements
    graph = onnx.load(destination, load_external_data=False)
    record_description(graph, description)
    Path(destination).write_bytes(graph.SerializeToString())
    return description


def top1_choices(path: str | os.PathLike, windows: torch.Tensor) -> np.ndarray:
    """The LM graph's most likely token at every position of each window (W, L), run by ONNX Runtime on the CPU."""
    from reformer.runtime import CPU, open_session

    session = open_session(path, [CPU])
    inputs = {graph_input.name for graph_input in session.get_inputs()}
    choices = []
    for window in windows.numpy():
        feeds = dict(zip(INPUT_NAMES, (window[None], np.ones_like(window)[None])))
        logits = session.run(None, {name: value for name, value in feeds.items() if name in inputs})[0]
        choices.append(logits.argmax(-1))
    return np.concatenate(choices)


def record_description(graph: onnx.ModelProto, description: dict) -> None:
    """Record a quantized graph's description (read back by quantization_of) in its metadata."""
    key = METADATA_PREFIX + QUANTIZATION_KEY
    kept = [entry for entry in graph.metadata_props if entry.key != key]
    del graph.metadata_props[:]
    graph.metadata_props.extend([*kept, onnx.StringStringEntryProto(key=key, value=json.dumps(description))])


@contextlib.contextmanager
def quantized_into(path: str, quantize: str | None, held_out: torch.Tensor | None = None,
                   recipe: str | None = None) -> Iterator[str]:
    """Where to write the fp32 graph: `path` itself, or (with `quantize`) a scratch folder beside it, whose
    graph is quantized into `path` (quantize_graph) when the block ends, and then removed."""
    if quantize is None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="fp32-", dir=os.path.dirname(os.path.abspath(path))) as scratch:
        fp32_path = os.path.join(scratch, os.path.basename(path))
        yield fp32_path
        quantize_graph(fp32_path, path, held_out, recipe)


def quantize_graph(source: str | os.PathLike, destination: str | os.PathLike, held_out: torch.Tensor | None = None,
                   recipe: str | None = None) -> dict:
    """quantize_onnx by the recipe named, else by the one the `held_out` windows choose (quantize_for_text),
    else by EVERY_PRODUCT; the description returned."""
    if recipe is None and held_out is not None:
        return quantize_for_text(source, destination, held_out)
    return quantize_onnx(source, destination, RECIPES[recipe or EVERY_PRODUCT.name])


def hashing_products(graph: onnx.ModelProto) -> list[str]:
    """Names of the products whose result reaches an ArgMax within HASHING_REACH nodes without passing through
    another product: the LSH hashing projections (argmax over the rotated vectors and their negatives)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = []
    for node in graph.graph.node:
        if node.op_type not in PRODUCTS:
            continue
        frontier, seen = [node], set()
        for _ in range(HASHING_REACH):
            following = [reader for current in frontier for output in current.output for reader in readers.get(output, [])
                         if reader.op_type not in PRODUCTS and id(reader) not in seen]
            seen.update(id(reader) for reader in following)
            if any(reader.op_type == "ArgMax" for reader in following):
                found.append(node.name)
                break
            frontier = following
    return found


def weighted_products(graph: onnx.ModelProto) -> dict[str, int]:
    """The products by a constant weight (an initializer): name -> the weight's number of dimensions."""
    dimensions = {tensor.name: len(tensor.dims) for tensor in graph.graph.initializer}
    return {node.name: next(dimensions[name] for name in node.input if name in dimensions)
            for node in graph.graph.node if node.op_type in PRODUCTS and any(name in dimensions for name in node.input)}


def per_head_products(graph: onnx.ModelProto) -> list[str]:
    """The products by per-head projection weights (3-D: heads, hidden, head size)."""
    return [name for name, dimensions in weighted_products(graph).items() if dimensions == 3]


def cached_state_products(graph: onnx.ModelProto) -> set[str]:
    """The weighted products of a decoder step graph that project cached states (float graph inputs named
    PAST_PREFIX...): those whose input is computed from one, not through another product and not through a
    Shape (positions come from the cache's length, not its values)."""
    from .decoder_graphs import PAST_PREFIX

    cached = {value.name for value in graph.graph.input
              if value.name.startswith(PAST_PREFIX) and value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    reading = set(cached)  # values computed from cached states (nodes are stored in topological order)
    for node in graph.graph.node:
        if node.op_type not in (*PRODUCTS, "Shape") and any(name in reading for name in node.input):
            reading.update(node.output)
    weighted = weighted_products(graph)
    return {node.name for node in graph.graph.node
            if node.name in weighted and any(name in reading for name in node.input)}


def first_layer_products(graph: onnx.ModelProto) -> list[str]:
    """The weighted products of the first layer: those with at most FIRST_LAYER_NORMS LayerNormalizations on
    their longest path from the graph's inputs (nodes are stored in topological order)."""
    norms_before: dict[str, int] = {}
    first_layer = []
    weighted = weighted_products(graph)
    for node in graph.graph.node:
        norms = max((norms_before.get(name, 0) for name in node.input), default=0)
        norms += node.op_type == "LayerNormalization"
        norms_before.update(dict.fromkeys(node.output, norms))
        if node.name in weighted and norms <= FIRST_LAYER_NORMS:
            first_layer.append(node.name)
    return first_layer


def onnxruntime_distribution() -> str:
    """Which package provides `onnxruntime` here (both the CPU and the GPU package do)."""
    for name in ("onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version(name)
            return name
    raise ExportError("int8 quantization needs onnxruntime: pip install onnxruntime")


@contextlib.contextmanager
def quiet_quantizer():
    """The quantizer prints the value infos its shape inference could not merge and logs a pre-processing
    advice; neither concerns a user of this tool."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def quantization_of(path: str | os.PathLike) -> dict | None:
    """The description a quantized graph records (quantize_onnx), None for an fp32 graph."""

    graph = onnx.load(path, load_external_data=False)
    for entry in graph.metadata_props:
        if entry.key == METADATA_PREFIX + QUANTIZATION_KEY:
            return json.loads(entry.value)
    return None
