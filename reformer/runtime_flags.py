"""Whether the model is being traced or exported (the only place the model asks)."""

from __future__ import annotations

import torch


def is_exporting() -> bool:
    """True under torch.jit.trace/script, torch.export and torch.onnx.export (dynamo)."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
