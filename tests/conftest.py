import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Test models are tiny: one thread avoids synchronisation overhead that dominates their run time.
torch.set_num_threads(1)

# Known warnings that say nothing about this project, filtered by their exact text through pytest's own
# mechanism (a warnings.filterwarnings call here is undone by pytest's per-test capture):
KNOWN_WARNINGS = (
    # torch.export's pytree code still uses the LeafSpec check that torch itself deprecates.
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning",
    # reformer/models.py checks its inputs' shapes in Python; a trace records them as constants, which is
    # what the tests that trace at one shape and run at others show to be harmless.
    "ignore:Converting a tensor to a Python boolean might cause the trace to be incorrect"
    ":torch.jit.TracerWarning:reformer.models",
)


# Where set, every ONNX Runtime session the tests open without choosing its intra-op threads gets this many
# (benchmarks/kernel_sweep.py runs the suite with 1 and with 2).
ORT_THREADS_VARIABLE = "REFORMER_TEST_ORT_THREADS"


def pytest_configure(config):
    for line in KNOWN_WARNINGS:
        config.addinivalue_line("filterwarnings", line)
    if os.environ.get(ORT_THREADS_VARIABLE):
        pin_onnx_runtime_threads(int(os.environ[ORT_THREADS_VARIABLE]))


def pin_onnx_runtime_threads(threads: int) -> None:
    import onnxruntime

    opened = onnxruntime.InferenceSession.__init__

    def open_with_threads(self, path_or_bytes, sess_options=None, *args, **kwargs):
        options = sess_options or onnxruntime.SessionOptions()
        if not options.intra_op_num_threads:
            options.intra_op_num_threads = threads
        opened(self, path_or_bytes, options, *args, **kwargs)

    onnxruntime.InferenceSession.__init__ = open_with_threads


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """huggingface_hub offline with its cache in tmp_path (tests never reach the Hub); returns
    `put(hub_id, checkpoint_directory) -> snapshot folder`, which lays a checkpoint out in the cache as a
    download leaves it: blobs/<hash>, snapshots/<commit>/<file> linking to its blob, refs/main naming the
    commit."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both variables once, when imported: set its copies too.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def put(hub_id: str, checkpoint_directory: Path) -> Path:
        repo = cache / ("models--" + hub_id.replace("/", "--"))
        commit = hashlib.sha1(hub_id.encode()).hexdigest()
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (repo / "blobs").mkdir()
        for path in Path(checkpoint_directory).iterdir():
            blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
            shutil.copy(path, blob)
            (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        return snapshot

    return put
