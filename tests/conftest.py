import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors on a 2-core machine: one intra-op thread avoids oversubscription with loader
    workers and spawned processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
