import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collection_modifyitems(config, items):
    """GPU tests skip (not fail) where there is no CUDA device or no compiled extension."""
    from fla_cuda import _extension
    reason = None
    if not torch.cuda.is_available():
        reason = "needs a CUDA device"
    elif not _extension.HAS_EXTENSION:
        reason = f"needs the CUDA extension ({_extension.LOAD_ERROR})"
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
