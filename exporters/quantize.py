"""`--quantize int8`: dynamic int8 quantization of an exported fp32 ONNX graph, by ONNX Runtime's own quantizer
(`onnxruntime.quantization.quantize_dynamic`), for the CPU.

Dynamic quantization stores each weight matrix as int8 with one scale, and quantizes the activation that meets
it to uint8 at run time, per call, from its own range; the product runs as an integer kernel (VNNI on CPUs
that have it) and is scaled back to float. Embedding tables are stored as int8 too and dequantized on lookup.
Products of two activations (the attention's query-key and weights-value products) stay fp32, and so does
everything that is not a product or a lookup.

What stays fp32 though it has a weight, measured on models/byte-lm (bits per byte over 1,024-byte windows of
the held-out random.py, top-1 agreement with eager) and the benchmarks' `small` model (4,096
tokens, onnxruntime 1.32, AMD EPYC, 12 interleaved runs, median):
- The LSH hashing projections (every product whose result reaches an ArgMax). A bucket is a discrete
  decision: quantizing the projection moves tokens to other buckets by more than any rounding, and the
  projection is a few columns per head (no measurable time).
- Nothing else. On the first byte-lm (3.45 bits per byte), the output head in fp32 kept top-1 agreement at
  99.42% against 99.20% (bits per byte +0.0002 against +0.0003, fp32 3.4648), took the same time on `small`
  within the noise (243 against 228 ms with 1 thread, 143 against 145 ms with 2; fp32 424 and 227 ms) and made
  the files 16% larger. On the retrained byte-lm (2.40 bits per byte on its 8 held-out windows)
  the first layer matters most: int8 there alone changed 2.2% of the top choices, in the fourth layer alone
  0.3%. The first layer and the head in fp32 gave 98.8% agreement everywhere against 97.4% (decided positions:
  the task verdict), and a file 47% of fp32's against 29%, with a quarter of the integer products gone: not
  worth it where the verdict passes without.

Weights are quantized per tensor. Per channel ran slower on `small` (332 against 243 ms, 1 thread), was no
more accurate there (top-1 97.1% against 96.6%, random weights) or on the retrained byte-lm (98.0% against
97.5% everywhere, with the 3-D weights per tensor), and fails at run time on the batched
per-head projections (3-D weights): ONNX Runtime's MatMulIntegerToFloat refuses their per-channel zero points
("b zero point is not valid")."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

from .errors import ExportError, first_line
from .onnx_files import data_file_name, needs_external_data
from .specs import METADATA_PREFIX

# Graph metadata key (with exporters.specs.METADATA_PREFIX) of the description quantize_onnx returns.
QUANTIZATION_KEY = "quantization"
PRODUCTS = ("MatMul", "Gemm")
# How far (in nodes) from a product to the ArgMax that reads it: the hashing reshapes and concatenates the
# rotated vectors between the two, nothing more.
HASHING_REACH = 8


def quantize_onnx(source: str | os.PathLike, destination: str | os.PathLike) -> dict:
    """Write the dynamic int8 quantization of the fp32 graph `source` to `destination`, with the graph's
    metadata and the description returned (also recorded under the metadata key QUANTIZATION_KEY); with a data
    file beside it (exporters.onnx_files) only where the source has one and the int8 weights still need it.
    Raises ExportError with a one-line message."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, destination = Path(source), Path(destination)
    graph = onnx.load(source, load_external_data=False)
    kept_fp32 = hashing_products(graph)
    external_data = any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in graph.graph.initializer)
    try:
        with quiet_quantizer():
            quantize_dynamic(source, destination, weight_type=QuantType.QInt8, per_channel=False,
                             nodes_to_exclude=kept_fp32, use_external_data_format=external_data)
    except Exception as error:  # the quantizer raises many kinds; the caller needs one, with the reason
        raise ExportError(f"int8 quantization failed: {type(error).__name__}: {first_line(error)}") from error
    # The quantizer keeps the source's data file form; int8 weights a quarter the size may fit in one file.
    data_file = destination.with_name(data_file_name(destination.name))
    one_file = external_data and data_file.exists() and not needs_external_data(data_file.stat().st_size)
    quantized = onnx.load(destination, load_external_data=one_file)
    integer_products = sum(node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
                           for node in quantized.graph.node)
    description = {
        "scheme": "int8 dynamic (onnxruntime.quantization.quantize_dynamic)",
        "weights": "int8, symmetric, per tensor",
        "activations": "uint8, per tensor, range computed at run time",
        "quantized_products": integer_products,
        "fp32_products": len(kept_fp32),
        "fp32": "LSH hashing projections; products of two activations (attention)",
        "onnxruntime": importlib.metadata.version(onnxruntime_distribution()),
    }
    metadata = {entry.key: entry.value for entry in graph.metadata_props}
    metadata[METADATA_PREFIX + QUANTIZATION_KEY] = json.dumps(description)
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(onnx.StringStringEntryProto(key=key, value=value) for key, value in metadata.items())
    # Loaded without external data unless one_file, so weights the quantizer wrote to a data file stay there.
    destination.write_bytes(quantized.SerializeToString())
    if one_file:
        data_file.unlink()
    return description


@contextlib.contextmanager
def quantized_into(path: str, quantize: str | None) -> Iterator[str]:
    """Where to write the fp32 graph: `path` itself, or (with `quantize`) a scratch folder beside it, whose
    graph is quantized into `path` (quantize_onnx) when the block ends, and then removed."""
    if quantize is None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="fp32-", dir=os.path.dirname(os.path.abspath(path))) as scratch:
        fp32_path = os.path.join(scratch, os.path.basename(path))
        yield fp32_path
        quantize_onnx(fp32_path, path)


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
