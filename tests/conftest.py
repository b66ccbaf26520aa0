"""Test-wide setup: a private cache for unpacked datasets, and the real data root.

Tests that need MNIST / Fashion-MNIST read them from the data root (``$REPLAYKIT_DATA``
or ``../shared/data``). When it is missing they fail loudly: they never skip.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning workers slow
# small convolutions down by an order of magnitude. Read when torch loads, i.e. after this line.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Unpacked datasets go to a throw-away folder, never into the (shared, read-only) data root.
os.environ.setdefault("REPLAYKIT_CACHE", tempfile.mkdtemp(prefix="replaykit-test-cache-"))


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The data root holding MNIST and Fashion-MNIST; fails (not skips) when absent."""
    from replaykit.data import data_root

    root = data_root()
    for name in ("MNIST", "FashionMNIST"):
        raw = root / name / "raw"
        if not raw.is_dir():
            pytest.fail(f"real-data tests need {raw}: set REPLAYKIT_DATA or provide ../shared/data (see shared/data/README.md)")
    return root
