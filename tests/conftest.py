import pytest
import torch

# Two cores here, shared with Ray workers during the sweep tests: one intra-op thread for the whole
# session avoids the oversubscription that made small convolutions ~20x slower with two (measured:
# resnet110 forward+backward 0.35 s with 1 thread, 9.4 s with 2 under load), and tiny tensors pay no
# second-thread wake-up per op. No test raises it again.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
