"""Fixtures shared by the training tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """Training sets torch's thread count for the process; put it back for the other tests."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
