"""The wheel as users install it: built from the checkout, installed (not editable) into a fresh venv with the
CPU runtime extra beside another distribution's top-level `models` package, it runs the default export."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BUILD_INPUTS = ("pyproject.toml", "README.md", "reformer", "exporters", "cli", "models")
PACKAGES = ("reformer", "exporters", "cli")


def run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    """`command` as outside this checkout: the test's PYTHONPATH (or, for `python -m`, a current directory
    holding reformer_export.egg-info) would make pip take the checkout for an installed reformer-export."""
    environment = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "VIRTUAL_ENV")}
    completed = subprocess.run([str(part) for part in command], cwd=cwd, env=environment, capture_output=True,
                               text=True, timeout=900)
    assert completed.returncode == 0, f"{command}\n{completed.stdout}\n{completed.stderr}"
    return completed


def build_wheel(folder: Path) -> Path:
    """The wheel of a copy of the checkout's build inputs (building in place would leave build/ behind, whose
    stale files later wheels would ship)."""
    source = folder / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", folder / "wheel", source], folder)
    (wheel,) = (folder / "wheel").glob("*.whl")
    return wheel


# In the default run (CI), though 1 to 2.5 minutes on 2 shared cores: build, fresh venv with torch and the CPU
# runtime, export.
def test_wheel_in_a_fresh_venv_finds_its_models_beside_a_foreign_models_package(tmp_path):
    wheel = build_wheel(tmp_path)
    shipped = set(zipfile.ZipFile(wheel).namelist())
    modules = {path.relative_to(ROOT).as_posix() for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    assert modules - shipped == set(), "modules missing from pyproject.toml's packages"
    assert "reformer_export_models/byte-lm/model.safetensors" in shipped
    assert not any(".data/" in name for name in shipped), "data-files install outside the packages"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path)
    python = venv / "bin" / "python"
    torch_release = torch.__version__.split("+")[0]  # as .ci/run installs it (a CPU build, from the local disk)
    run([python, "-m", "pip", "install", "--quiet", f"torch=={torch_release}", f"{wheel}[runtime]"], tmp_path)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = Path(run([python, "-c", purelib], tmp_path).stdout.strip())
    (site_packages / "models").mkdir()
    (site_packages / "models" / "__init__.py").write_text('"""Another distribution\'s top-level package."""\n')

    work = tmp_path / "work"
    work.mkdir()
    models_dir = run([python, "-c", "import models, exporters.models; print(exporters.models.MODELS_DIR)"],
                     work).stdout.strip()
    assert Path(models_dir) == site_packages / "reformer_export_models"
    result = run([venv / "bin" / "reformer-export", "--format", "onnx"], work)
    assert "byte-lm (built-in)" in result.stdout and "verification  passed" in result.stdout, result.stdout
    assert os.listdir(work) == ["byte-lm-causal-lm.onnx"]
