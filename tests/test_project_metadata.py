"""What pyproject.toml and the exporters' docstring say about the project: every export format by name, and
only files that exist."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import exporters
from exporters.formats import FORMATS

ROOT = Path(__file__).resolve().parent.parent
FORMAT_NAMES = {"onnx": "ONNX", "aoti": "AOTInductor", "torchscript": "TorchScript", "triton": "Triton"}


def test_description_and_exporters_docstring_name_every_format():
    description = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]
    assert set(FORMAT_NAMES) == set(FORMATS), "a new --format needs its name here"
    for text in (description, exporters.__doc__):
        assert [name for name in FORMAT_NAMES.values() if name not in text] == []
        assert "int8" in text


def test_files_named_in_pyproject_exist():
    # A path may wrap after a slash onto the next comment line.
    text = re.sub(r"/\n#\s*", "/", (ROOT / "pyproject.toml").read_text())
    named = re.findall(r"[\w./-]+\.py\b", text)
    assert named, "expected pyproject.toml's comments to name source files"
    assert [path for path in named if not (ROOT / path).is_file()] == []
