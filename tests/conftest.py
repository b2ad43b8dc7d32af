"""Shared test set-up for attnkit.

* ``tests/`` goes on ``sys.path`` so every test can ``from reference import ...`` (the float64 oracle,
  tests/reference.py). There is deliberately no ``tests/__init__.py``.
* Hypothesis profile ``attnkit`` (the default): few examples, no deadline, derandomized so CI runs are
  reproducible; ``HYPOTHESIS_PROFILE=thorough`` runs more examples with fresh randomness.
* ``browser``: headless Chromium through Selenium (tests/browser.py), skipped with the reason when absent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from browser import browser  # noqa: E402, F401  (the headless Chromium fixture, tests/browser.py)

settings.register_profile(
    "attnkit", max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "attnkit"))


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator: tests draw their data from it, never from the global RNG."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """Kernel tests run on every device at hand: the CPU always, CUDA where there is one (skipped otherwise)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    return torch.device(request.param)
