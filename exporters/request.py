"""What to export and how: the one argument of exporters.api.run_export, without torch (exporters.formats
reads it to check and apply each format's options)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExportRequest:
    """What to export and how. Field meanings follow the CLI options of the same names."""

    format: str  # a name in exporters.formats.FORMATS
    model: str | None = None  # checkpoint directory or built-in model name (None: exporters.choices.DEFAULT_MODEL)
    task: str | None = None  # None: the checkpoint's own task (exporters.models.default_task)
    output: str | None = None  # None: <model name>-<task><the format's suffix> in the current directory
    opset: int | None = None  # ONNX only (None: exporters.choices.DEFAULT_OPSET)
    dtype: str = "fp32"
    device: str = "cpu"
    max_length: int | None = None  # longest sequence the export must serve (None: max_position_embeddings)
    custom_ops: str | None = None  # ONNX only (None: exporters.choices.DEFAULT_CUSTOM_OPS)
    atol: float | None = None  # with verify only (None: the task's tolerance for the dtype, the verifier's default)
    with_buckets: bool = False  # also output each LSH layer's buckets (for checking bucket agreement)
    verify: bool = True
    keep_failed: bool = False  # with verify only
    report: str | None = None  # path of a JSON report (None: no report)
    triton_backend: str | None = None  # format triton only (None: exporters.choices.DEFAULT_TRITON_BACKEND)
    native_isa: bool = False  # aoti only: build for this machine's CPU instruction set, not the portable one
    quantize: str | None = None  # ONNX graphs only: "int8" (exporters.quantize), None for fp32
