import pytest
import torch

# Two cores here, shared with Ray workers during the sweep tests: one intra-op thread avoids the
# oversubscription that made small convolutions ~20x slower with two.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
