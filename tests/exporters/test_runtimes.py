"""exporters.runtimes.require_onnxruntime, which the onnx format requires when it verifies (exporters.formats):
a runtime that verification needs and cannot import is reported in one line with the install command, before
any model is loaded."""

from __future__ import annotations

import sys
import types

import pytest

from exporters.errors import ExportError
from exporters.formats import GRAPH_FORMATS
from exporters.request import ExportRequest
from exporters.runtimes import require_onnxruntime


def test_installed_onnxruntime_passes():
    import onnxruntime

    assert callable(onnxruntime.InferenceSession)  # a working build is installed here (the test extra's)
    assert require_onnxruntime() is None  # and the requirement raises nothing


def test_missing_onnxruntime_names_both_builds_and_no_verify(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it imports
    with pytest.raises(ExportError) as raised:
        GRAPH_FORMATS["onnx"].require(ExportRequest("onnx", verify=True))
    message = str(raised.value)
    assert "\n" not in message
    assert "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)" in message and "--no-verify" in message


@pytest.mark.parametrize("fmt,verify", [("onnx", False), ("torchscript", True), ("torchscript", False)])
def test_no_runtime_needed_without_onnx_verification(fmt, verify, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    GRAPH_FORMATS[fmt].require(ExportRequest(fmt, verify=verify))


def test_leftover_of_an_uninstalled_build_says_how_to_reinstall(monkeypatch):
    """Installing both builds, then uninstalling one, leaves an onnxruntime folder that imports as an empty
    namespace package (seen with onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1)."""
    monkeypatch.setitem(sys.modules, "onnxruntime", types.ModuleType("onnxruntime"))
    with pytest.raises(ExportError, match=r"does not import \(cannot import name 'InferenceSession'.*pip uninstall "
                                          r"onnxruntime onnxruntime-gpu, then pip install onnxruntime or "
                                          r"onnxruntime-gpu"):
        require_onnxruntime()
