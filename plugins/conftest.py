"""Shared by the bundled plugins' tests: torch on one intra-op thread.

The plugins' tests run small tensors and tiny models, where a second thread only adds
synchronization, and on cores shared with other work it makes them several times slower.
Each test module starts on one thread and gets the previous count back when it ends.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
