"""exporters.runtimes.require_runtime: a runtime that verification needs and cannot import is reported in one
line with the install command, before any model is loaded."""

from __future__ import annotations

import builtins
import sys

import pytest

from exporters.errors import ExportError
from exporters.runtimes import require_runtime


def test_installed_onnxruntime_passes():
    require_runtime("onnx", verify=True)


def test_missing_onnxruntime_names_both_builds_and_no_verify(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it imports
    with pytest.raises(ExportError) as raised:
        require_runtime("onnx", verify=True)
    message = str(raised.value)
    assert "\n" not in message
    assert "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)" in message and "--no-verify" in message


@pytest.mark.parametrize("fmt,verify", [("onnx", False), ("torchscript", True), ("torchscript", False)])
def test_no_runtime_needed_without_onnx_verification(fmt, verify, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    require_runtime(fmt, verify)


def test_broken_onnxruntime_says_how_to_reinstall(monkeypatch):
    real_import = builtins.__import__

    def broken_import(name, *arguments, **options):
        if name == "onnxruntime":
            raise ImportError("cannot import name 'get_all_providers' from 'onnxruntime.capi._pybind_state'")
        return real_import(name, *arguments, **options)

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken_import)
    with pytest.raises(ExportError, match=r"does not import \(cannot import name 'get_all_providers'.*pip uninstall "
                                          r"onnxruntime onnxruntime-gpu"):
        require_runtime("onnx", verify=True)
