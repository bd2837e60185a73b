"""Writing files so that a reader never sees half of one: everything is written into a staging folder beside
its destination (same file system, so the final rename is atomic) and renamed into place only when whole.
The staging folder is removed whatever happens; `reformer-export` turns SIGTERM into an exception (see
cli/main.py), so a terminated export cleans up as an interrupted one does.

One module for every writer in the project: checkpoints, exported graphs (a file and its external data, or a
folder of graphs), reports."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator

STAGING_PREFIX = ".reformer-export-"


def mode_after_umask(permissions: int) -> int:
    """The mode a new file (0o666) or folder (0o777) gets under the process's umask; mkstemp and mkdtemp
    ignore the umask and make theirs private."""
    umask = os.umask(0)
    os.umask(umask)
    return permissions & ~umask


@contextlib.contextmanager
def staging_folder(destination: str) -> Iterator[str]:
    """A fresh folder beside `destination` (a file or folder path), removed on exit. Raises OSError when the
    destination's folder cannot be written."""
    folder = os.path.dirname(os.path.abspath(destination))
    path = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(staged: str, destination: str) -> None:
    """Rename a staged file or folder to `destination`, with the permissions a plain open() or mkdir() would
    have given it (the staging folder is private)."""
    os.chmod(staged, mode_after_umask(0o777 if os.path.isdir(staged) else 0o666))
    os.replace(staged, destination)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(temporary_path) and move the result to path, so that path never holds a partial file."""
    with staging_folder(path) as staging:
        staged = os.path.join(staging, os.path.basename(path))
        write(staged)
        publish(staged, path)


def write_json(values: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(values, handle, indent=2, sort_keys=True)
        handle.write("\n")


def write_json_atomically(values: dict, path: str) -> None:
    atomic_write(path, lambda temporary: write_json(values, temporary))
