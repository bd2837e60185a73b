"""Export precisions and devices, shared by the exporters and the verifier."""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

from .choices import DEVICES, DTYPES
from .errors import ExportError

TORCH_DTYPES = {name: getattr(torch, torch_name) for name, torch_name in DTYPES.items()}


def torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return TORCH_DTYPES[dtype]


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise ExportError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("device 'cuda' requested but torch sees no CUDA device: use --device cpu")


def model_as(model: nn.Module, dtype: str, device: str) -> nn.Module:
    """The model in eval mode on `device` in `dtype`: the model itself when it already is, else a copy
    (the caller's model stays as it was)."""
    target_dtype = torch_dtype(dtype)
    check_device(device)
    parameter = next(model.parameters())
    if parameter.dtype == target_dtype and parameter.device.type == device:
        return model.eval()
    return copy.deepcopy(model).to(device=device, dtype=target_dtype).eval()


@contextlib.contextmanager
def training_modes_kept(model: nn.Module) -> Iterator[None]:
    """Every submodule's training flag as it was on entry, again on exit: `model_as` puts the model itself in
    eval mode where it needs no copy, and a caller's model in training stays in training."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
