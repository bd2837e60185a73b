"""reformer.files: staging folders record their owner, and a new one removes those whose owner is gone (a
process killed outright), never a live process's, another pid namespace's or one that records no owner."""

from __future__ import annotations

import os
import subprocess
import sys

from reformer.files import STAGING_PREFIX, pid_namespace, process_start_time, staging_folder, write_json_atomically


def staged_by(folder, namespace: int, pid: int, start: int) -> str:
    path = os.path.join(folder, f"{STAGING_PREFIX}{namespace}-{pid}-{start}-abc123")
    os.mkdir(path)
    open(os.path.join(path, "half-written.onnx"), "w").close()
    return os.path.basename(path)


def ended_process() -> tuple[int, int]:
    """(pid, start time) of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = process_start_time(child.pid)
    child.kill()
    child.wait()
    return child.pid, start


def test_staging_folder_names_its_owner(tmp_path):
    with staging_folder(str(tmp_path / "out.onnx")) as staging:
        name = os.path.basename(staging)
        assert name.startswith(f"{STAGING_PREFIX}{pid_namespace()}-{os.getpid()}-{process_start_time(os.getpid())}-")
    assert os.listdir(tmp_path) == []


def test_next_write_removes_staging_of_ended_processes_only(tmp_path):
    namespace = pid_namespace()
    ended_pid, ended_start = ended_process()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = [staged_by(tmp_path, namespace, ended_pid, ended_start),
                 # the id reused by a later process: the start time tells them apart
                 staged_by(tmp_path, namespace, live.pid, process_start_time(live.pid) - 1)]
        kept = [staged_by(tmp_path, namespace, live.pid, process_start_time(live.pid)),
                staged_by(tmp_path, namespace, os.getpid(), process_start_time(os.getpid())),
                staged_by(tmp_path, namespace + 1, ended_pid, ended_start),  # another namespace's ids
                f"{STAGING_PREFIX}k2j4h1x9"]  # an older version's, which names no owner
        os.mkdir(tmp_path / kept[-1])
        write_json_atomically({"a": 1}, str(tmp_path / "report.json"))
        assert sorted(os.listdir(tmp_path)) == sorted(kept + ["report.json"])
        assert not set(stale) & set(os.listdir(tmp_path))
    finally:
        live.kill()
        live.wait()
