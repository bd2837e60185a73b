"""Writing ONNX graphs: one file, or, when the weights would take the file past protobuf's 2 GiB limit, the
graph with every weight in one data file beside it, `<graph file name>.data`, which the graph names by that
relative path (ONNX Runtime reads it from the graph's folder; reformer.file_checks refuses any other place).
The pair is written in one staging folder and moved into place data first, so the graph never refers to
missing data. The exporter (exporters/onnx.py) and the int8 quantizer (exporters/quantize.py) decide here."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from reformer.files import publish, staging_folder

from .errors import ExportError, first_line

# A protobuf file cannot exceed 2 GiB; weights above this share (the graph needs the rest) go to a data file.
EXTERNAL_DATA_THRESHOLD = int(0.9 * 2**31)


def data_file_name(graph_name: str) -> str:
    """The data file's name beside the graph file `graph_name` (also what ONNX Runtime's quantizer writes)."""
    return graph_name + ".data"


def needs_external_data(weight_bytes: int) -> bool:
    """Whether weights of this size must go to a data file (small graphs stay one file)."""
    return weight_bytes > EXTERNAL_DATA_THRESHOLD


def initializer_bytes(model: ir.Model) -> int:
    return sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value is not None)


def save_atomically(model: ir.Model, path: Path, external_data: bool | None = None) -> None:
    """Write into a staging folder next to `path`, check the file, then move it (its data file first) in place.
    external_data None: a data file only when the weights need one (needs_external_data)."""
    if external_data is None:
        external_data = needs_external_data(initializer_bytes(model))
    data_name = data_file_name(path.name)
    try:
        with staging_folder(str(path)) as staging:
            staged = Path(staging) / path.name
            ir.save(model, staged, external_data=data_name if external_data else None)
            try:
                onnx.checker.check_model(str(staged))
            except onnx.checker.ValidationError as error:
                raise ExportError(f"the exported ONNX file is invalid: {first_line(error)}") from error
            if external_data:
                publish(str(Path(staging) / data_name), str(path.parent / data_name))
            publish(str(staged), str(path))
    except OSError as error:
        raise ExportError(f"cannot write {path}: {error.strerror}") from None
