"""A real Triton Inference Server on a model repository (`reformer-export --format triton`), started and stopped
from Python: `with TritonServer(repository) as server: ...` or `reformer-serve REPOSITORY`.

The server binary is a `tritonserver` on the PATH (NVIDIA's images put one there, with their backends), else the
one inside the `nvidia-pytriton` wheel (the `serve` extra), which ships the Python backend only, with one stub
executable per Python version: the stub for the running Python is laid out beside the backend in a private
backend directory, as Triton looks for it next to `libtriton_python.so`.

The stub embeds the system's libpython, whose `sys.path` is not this environment's: the server gets the package
folders of the environment models run in (this one's, or those `PYTHONPATH_VARIABLE` names already) in
`PYTHONPATH_VARIABLE`, and each Python-backend `model.py` that reformer-export writes puts them in front of its
`sys.path` before importing `exporters.triton.backend`. The wheel's stub is built against numpy 1.x
(nvidia-pytriton requires numpy<2): under numpy 2 it reads and writes tensors wrongly (inputs with the wrong
strides, empty outputs), so models must run in an environment with numpy 1.x, which installing the `serve`
extra gives.

The server runs in a session of its own, so stopping it (SIGTERM, then SIGKILL after `stop_timeout`) ends the
stub processes of its Python models with it."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator

PYTHONPATH_VARIABLE = "REFORMER_EXPORT_PYTHONPATH"
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
PYTHON_STUB = "triton_python_backend_stub"


class TritonServerError(RuntimeError):
    """No server binary, or a server that exited or did not become ready."""


def find_server() -> tuple[str, str | None]:
    """(tritonserver binary, the pytriton wheel's server folder or None for a binary on the PATH, which uses
    its own backends). Raises TritonServerError when there is neither."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return on_path, None
    spec = importlib.util.find_spec("pytriton")  # found, not imported: the server is all that is used
    if spec is not None and spec.submodule_search_locations:
        folder = os.path.join(spec.submodule_search_locations[0], "tritonserver")
        binary = os.path.join(folder, "bin", "tritonserver")
        if os.access(binary, os.X_OK):
            return binary, folder
    raise TritonServerError("no Triton server: put a tritonserver on the PATH, or install the serve extra "
                            "(pip install 'reformer-export[serve]', which brings nvidia-pytriton's server)")


def wheel_backends(server_folder: str, destination: str) -> str:
    """A backend directory under `destination` holding the wheel's Python backend with the stub for the running
    Python (the wheel keeps one stub per version apart from the backend), as links to the wheel's files (which
    find the wheel's libraries relative to their real place). Returns its path."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = os.path.join(server_folder, "python_backend_stubs", version, PYTHON_STUB)
    if not os.path.isfile(stub):
        raise TritonServerError(f"the Triton server in {server_folder} has no Python backend stub for Python "
                                f"{version}")
    backend = os.path.join(server_folder, "backends", "python")
    linked = os.path.join(destination, "backends", "python")
    os.makedirs(linked)
    for name in os.listdir(backend):
        if name != "__pycache__":
            os.symlink(os.path.join(backend, name), os.path.join(linked, name))
    os.symlink(stub, os.path.join(linked, PYTHON_STUB))
    return os.path.dirname(linked)


def environment_paths() -> list[str]:
    """This interpreter's package folders: sys.path without the standard library (which the stub's interpreter
    has its own of) and the current folder."""
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix, "installed_base": sys.base_prefix,
            "installed_platbase": sys.base_exec_prefix}
    stdlib = {os.path.realpath(sysconfig.get_path(name, vars=base)) for name in ("stdlib", "platstdlib")}
    paths = []
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue  # the current folder (""), zipped standard libraries, missing folders
        real = os.path.realpath(entry)
        in_stdlib = any(real == folder or real.startswith(folder + os.sep) for folder in stdlib)
        if not in_stdlib or os.path.basename(real) in ("site-packages", "dist-packages"):
            paths.append(os.path.abspath(entry))
    return paths


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def live_processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/<pid>/stat after the command name: state, parent, process group, ...) of every
    process but zombies. Nothing without /proc."""
    for entry in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:  # a process that just ended
            continue
        if fields[0] != "Z":
            yield int(entry), fields


def processes_in_group(group: int) -> list[int]:
    """The live processes whose process group is `group`: a server's session, which holds the server and its
    models' processes."""
    return [pid for pid, fields in live_processes() if int(fields[2]) == group]


def child_processes(parent: int) -> list[int]:
    """The live processes whose parent is `parent` (reformer-serve's: its tritonserver)."""
    return [pid for pid, fields in live_processes() if int(fields[1]) == parent]


def model_processes(server_pid: int) -> dict[int, str]:
    """The Python models' processes (the backend's stubs) of the server `server_pid`, which are in its process
    group: pid -> the model's name (the folder of its model.py). Empty without /proc."""
    found = {}
    for pid in processes_in_group(server_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                command = handle.read().decode(errors="replace").split("\0")
        except OSError:  # a process that just ended
            continue
        if os.path.basename(command[0]) == PYTHON_STUB and len(command) > 1:
            found[pid] = os.path.basename(os.path.dirname(os.path.dirname(command[1])))
    return found


class TritonServer:
    """One tritonserver process on `repository`. Ports: None picks a free one (ports[name] says which)."""

    def __init__(self, repository: str, http_port: int | None = DEFAULT_PORTS["http"],
                 grpc_port: int | None = DEFAULT_PORTS["grpc"], metrics_port: int | None = DEFAULT_PORTS["metrics"],
                 binary: str | None = None, log_path: str | None = None, exit_timeout: int = 5,
                 stop_timeout: float = 15.0, python_paths: list[str] | None = None):
        """binary: a tritonserver to run (None: `find_server`); log_path: where the server's output goes (None:
        a file in the server's private folder, removed on stop; its tail is in the errors); exit_timeout: how long
        the server lets requests and client connections in flight finish when stopped (seconds), stop_timeout:
        how long stop() waits for it to exit before killing it; python_paths: the package folders Python-backend
        models import from (None: those PYTHONPATH_VARIABLE names, else this environment's)."""
        if not os.path.isdir(repository):
            raise TritonServerError(f"model repository {repository} is not a directory")
        self.repository = os.path.abspath(repository)
        requested = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.ports = {name: free_port() if port is None else port for name, port in requested.items()}
        self.binary = binary
        self.log_path = log_path
        self.python_paths = python_paths
        self.exit_timeout = exit_timeout
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen | None = None
        self.private_folder: str | None = None

    @property
    def http_url(self) -> str:
        return f"localhost:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.ports['grpc']}"

    def command(self, binary: str, backends: str | None) -> list[str]:
        command = [binary, "--model-repository", self.repository,
                   "--http-port", str(self.ports["http"]), "--grpc-port", str(self.ports["grpc"]),
                   "--metrics-port", str(self.ports["metrics"]),
                   "--exit-timeout-secs", str(self.exit_timeout)]
        return command + (["--backend-directory", backends] if backends else [])

    def start(self, timeout: float = 180.0) -> "TritonServer":
        """Start the server and wait until it and every model are ready. Raises TritonServerError (with the
        server's last log lines) when it exits or is not ready in time; nothing is left running then."""
        if self.process is not None:
            raise TritonServerError("this server is already started")
        binary, wheel_folder = (self.binary, None) if self.binary else find_server()
        self.private_folder = tempfile.mkdtemp(prefix="reformer-triton-")
        try:
            backends = wheel_backends(wheel_folder, self.private_folder) if wheel_folder else None
            log_path = self.log_path or os.path.join(self.private_folder, "server.log")
            environment = {**os.environ, PYTHONPATH_VARIABLE: os.pathsep.join(self.model_paths(wheel_folder))}
            with open(log_path, "ab") as log:
                self.process = subprocess.Popen(self.command(binary, backends), stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=environment, start_new_session=True)
            self.wait_until_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def model_paths(self, wheel_folder: str | None) -> list[str]:
        if self.python_paths is not None:
            return self.python_paths
        if os.environ.get(PYTHONPATH_VARIABLE):
            return os.environ[PYTHONPATH_VARIABLE].split(os.pathsep)
        import numpy

        if wheel_folder and int(numpy.__version__.split(".")[0]) >= 2:
            raise TritonServerError(f"the Python backend of nvidia-pytriton's server needs numpy 1.x in the models' "
                                    f"environment, and this one has numpy {numpy.__version__}: install the serve "
                                    f"extra (numpy<2), or name the package folders of an environment with numpy<2 in "
                                    f"{PYTHONPATH_VARIABLE}")
        return environment_paths()

    def wait(self, poll_seconds: float = 0.5) -> None:
        """Block while the server and its models' processes run. Raises TritonServerError when the server exits
        or a Python model's process ends (killed, or out of memory): Triton (2.51) then reports that model ready
        and answers each of its requests with an error (`Stub process '<model>_0_0' is not healthy.`) without
        restarting the process, so the server is no longer serving it."""
        models = model_processes(self.process.pid)
        while self.process.poll() is None:
            ended = sorted(models[pid] for pid in set(models) - set(model_processes(self.process.pid)))
            if ended:
                raise TritonServerError(f"the process of model {', '.join(ended)} ended: tritonserver answers its "
                                        "requests with errors and does not restart it")
            time.sleep(poll_seconds)
        raise TritonServerError(f"tritonserver exited with status {self.process.returncode}: {self.log_tail()}")

    def wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonServerError(f"tritonserver exited with status {self.process.returncode} before it was "
                                        f"ready: {self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise TritonServerError(f"tritonserver was not ready after {timeout:.0f} s: {self.log_tail()}")

    def is_ready(self) -> bool:
        """The server's HTTP readiness endpoint answers 200 (every model loaded and ready)."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def log_tail(self, lines: int = 15) -> str:
        path = self.log_path or (os.path.join(self.private_folder, "server.log") if self.private_folder else None)
        if not path or not os.path.isfile(path):
            return "(no server log)"
        with open(path, encoding="utf-8", errors="replace") as handle:
            return " | ".join(line.strip() for line in handle.readlines()[-lines:] if line.strip())

    def stop(self) -> int | None:
        """Stop the server and its model processes (SIGTERM to its session, SIGKILL after stop_timeout) and
        remove its private folder. Returns the server's exit status (None: it was not running)."""
        status = None
        if self.process is not None:
            if self.process.poll() is None:
                self.signal_session(signal.SIGTERM)
                try:
                    self.process.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self.signal_session(signal.SIGKILL)
                    self.process.wait()
            # Stubs that outlive the server (killed, or stopped before its models were) are in its session.
            self.signal_session(signal.SIGKILL)
            status = self.process.returncode
            self.process = None
        if self.private_folder:
            shutil.rmtree(self.private_folder, ignore_errors=True)
            self.private_folder = None
        return status

    def signal_session(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)  # the session's process group has the server's id

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
