"""Faults during `reformer-export`: a full file system ends the export with one `Error:` line and nothing at
the output path; a process killed outright (`kill -9`) leaves no output, only its staging folder, which the
next export into that folder removes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from cli import main as cli_main
from reformer.files import STAGING_PREFIX

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def small_file_system(folder, size: str):
    """A tmpfs of `size` mounted on `folder` (needs root and a kernel that lets this process mount one)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    os.makedirs(folder)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("format_, output", [("onnx", "tiny.onnx"), ("torchscript", "tiny.pt")])
def test_full_file_system_ends_with_one_line_and_leaves_nothing(format_, output, tmp_path):
    with small_file_system(tmp_path / "full", "64k") as folder:
        result = CliRunner().invoke(cli_main.main, ["--model", "tiny", "--format", format_, "--no-verify",
                                                    "--output", str(folder / output)])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert result.stderr.splitlines()[-1].startswith("Error: "), result.stderr
        assert "No space left on device" in result.stderr.splitlines()[-1], result.stderr
        assert os.listdir(folder) == []


def test_kill_9_leaves_a_staging_folder_that_the_next_export_removes(tmp_path):
    """SIGKILL allows no cleanup: the export leaves no output, only its staging folder, whose name records the
    dead process; the next export into that folder removes it."""
    folder = tmp_path / "out"
    folder.mkdir()
    search_path = os.pathsep.join(filter(None, [REPOSITORY, os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "--model", "tiny", "--format", "onnx", "--output", str(folder / "a.onnx")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": search_path}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not os.listdir(folder):
            assert process.poll() is None, "the export ended before it could be killed"
            assert time.monotonic() < deadline, "no staging folder after 120 s"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    left = os.listdir(folder)
    assert len(left) == 1 and left[0].startswith(f"{STAGING_PREFIX}") and f"-{process.pid}-" in left[0]
    result = CliRunner().invoke(cli_main.main, ["--model", "tiny", "--format", "torchscript", "--no-verify",
                                                "--output", str(folder / "b.pt")])
    assert result.exit_code == 0, result.output
    assert os.listdir(folder) == ["b.pt"]
