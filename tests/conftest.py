"""Shared test setup: make ``tests/official_reference.py`` importable under any pytest import mode, and the
``one_thread`` fixture for modules whose models are tiny."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add contention (they spin, 10x slower on a busy 2-core machine).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
