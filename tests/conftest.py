import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Test models are tiny: one thread avoids synchronisation overhead that dominates their run time.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
