"""The translate tests train tiny models: one thread is faster than two for them (and far faster when the
machine is shared), so every test here runs single-threaded and restores the setting afterwards."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
