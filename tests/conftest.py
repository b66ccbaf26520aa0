"""Test-wide setup: the real data root, and a private cache for unpacked datasets.

Tests that need MNIST / Fashion-MNIST take the ``real_data_root`` fixture. The root is the one
the library resolves: ``$REPLAYKIT_DATA``, else ``../shared/data`` (CI), else the user cache
(``$REPLAYKIT_CACHE/data``, default ``~/.cache/replaykit/data``). Only on that last, a user's
machine, are missing datasets downloaded, once, with torchvision (md5-checked); CI's roots are
never downloaded into. When the files cannot be had the tests fail, naming the files to put
where: they never skip.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning workers slow
# small convolutions down by an order of magnitude. Read when torch loads, i.e. after this line.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from replaykit import data  # noqa: E402  (imports torch, so after OMP_WAIT_POLICY)

REAL_DATASETS = ("mnist", "fashion-mnist")
# Resolved before REPLAYKIT_CACHE moves to a throw-away folder below, so that the last resort
# is the user's own cache, where a download is kept for the next session.
REAL_DATA_ROOT = data.data_root()
MAY_DOWNLOAD = REAL_DATA_ROOT == data.cache_dir() / "data"
os.environ["REPLAYKIT_DATA"] = str(REAL_DATA_ROOT)  # every test and subprocess reads this root
# Unpacked datasets go to a throw-away folder, never into the (shared, read-only) data root.
os.environ.setdefault("REPLAYKIT_CACHE", tempfile.mkdtemp(prefix="replaykit-test-cache-"))
_downloaded: list[str] = []


def pytest_collection_modifyitems(config, items) -> None:
    """``cuda``-marked tests need a CUDA device: where torch sees none they are skipped, saying so."""
    import torch

    if torch.cuda.is_available():
        return
    reason = f"needs a CUDA device; this torch ({torch.__version__}) sees none (benchmarks/gpu_check.py runs these on a GPU)"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_report_header(config) -> str:
    policy = "user cache: missing datasets are downloaded once" if MAY_DOWNLOAD else "never downloaded into"
    return f"replaykit data root: {REAL_DATA_ROOT} ({policy})"


def pytest_terminal_summary(terminalreporter) -> None:
    if _downloaded:
        terminalreporter.write_line(f"replaykit: downloaded {', '.join(_downloaded)} into {REAL_DATA_ROOT}")


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The data root holding MNIST and Fashion-MNIST; fails (not skips) when they cannot be had."""
    try:
        _downloaded.extend(data.ensure_datasets(REAL_DATASETS, REAL_DATA_ROOT, download=MAY_DOWNLOAD))
    except data.DatasetNotFoundError as exc:
        why = "" if MAY_DOWNLOAD else " ($REPLAYKIT_DATA or ../shared/data names this root, so nothing is downloaded into it)"
        pytest.fail(f"real-data tests need MNIST and Fashion-MNIST: {exc}{why}", pytrace=False)
    return REAL_DATA_ROOT
