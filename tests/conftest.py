import os
import sys

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


def pytest_configure(config):
    for line in KNOWN_WARNINGS:
        config.addinivalue_line("filterwarnings", line)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
