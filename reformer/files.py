"""Writing files so that a reader never sees half of one: everything is written into a staging folder beside
its destination (same file system, so the final rename is atomic) and renamed into place only when whole.
The staging folder is removed whatever happens; `reformer-export` turns SIGTERM into an exception (see
cli/main.py), so a terminated export cleans up as an interrupted one does. Only a process killed outright
(`kill -9`, the machine losing power) leaves its staging folder: its name records the owner (process id, the
process's start time, which tells a reused id apart, and its pid namespace, inside which ids mean that
process), and the next staging folder made in that folder removes those whose owner is gone.

One module for every writer in the project: checkpoints, exported graphs (a file and its external data, or a
folder of graphs), reports."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Callable, Iterator

STAGING_PREFIX = ".reformer-export-"
# After the prefix: <pid namespace>-<pid>-<start time>-<mkdtemp's random part>; 0 where the system has no /proc.
STAGING_OWNER = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)-(\d+)-(\d+)-")


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
    remove_stale_staging(folder)
    owner = f"{pid_namespace()}-{os.getpid()}-{process_start_time(os.getpid())}"
    path = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{owner}-", dir=folder)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pid_namespace() -> int:
    """The id of this process's pid namespace (0 without /proc): process ids mean the same processes only
    inside one namespace (containers sharing a folder may each have their own)."""
    try:
        return int(re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")) or 0)
    except OSError:
        return 0


def process_start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (0 without /proc), or None when there is no such
    process, or only its exit status is left (a zombie): a later process given the same id has another start
    time."""
    if not os.path.isdir("/proc/self"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # alive, another user's
            pass
        return 0
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()  # from field 3: the command before may hold spaces
        return None if fields[0] == "Z" else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def remove_stale_staging(folder: str) -> None:
    """Remove this user's staging folders in `folder` whose owner (see the module docstring) is gone. One made
    in another pid namespace, whose ids mean other processes, or by an older version, which recorded no owner,
    is left alone."""
    namespace, user = pid_namespace(), getattr(os, "getuid", lambda: 0)()
    try:
        names = os.listdir(folder)
    except OSError:  # a folder we may write but not list: nothing to clean
        return
    for name in names:
        owner = STAGING_OWNER.match(name)
        if owner is None or int(owner[1]) != namespace:
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):  # gone already: another export cleaned it
            if os.lstat(path).st_uid == user and process_start_time(int(owner[2])) != int(owner[3]):
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
