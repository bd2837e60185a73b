"""The runtime an ONNX export's verification needs, checked before any slow step (exporters.formats,
`require`): ONNX Runtime, either build, `onnxruntime` or `onnxruntime-gpu`, an optional dependency.
AOTInductor packages and TorchScript files are verified with torch itself (an AOTInductor export also needs a
C++ compiler: exporters.aoti.require_compiler)."""

from __future__ import annotations

from .errors import ExportError, first_line


def require_onnxruntime() -> None:
    """Raise ExportError, with the install command, when ONNX Runtime does not import here."""
    try:
        # A name from the package, not just the package: the folder that uninstalling one of two builds
        # installed together leaves behind imports as an empty namespace package.
        from onnxruntime import InferenceSession  # noqa: F401
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name == "onnxruntime":
            raise ExportError("verifying an ONNX export needs ONNX Runtime, which is not installed: pip install "
                              "onnxruntime (CPU) or onnxruntime-gpu (CUDA), not both; or skip it with --no-verify"
                              ) from None
        raise ExportError(f"ONNX Runtime does not import ({first_line(error)}): reinstall one build, pip uninstall "
                          "onnxruntime onnxruntime-gpu, then pip install onnxruntime or onnxruntime-gpu") from None
