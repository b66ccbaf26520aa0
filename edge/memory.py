"""Resident-memory readings for the device process, standard library only."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


class MemoryLimitError(MemoryError, ValueError):
    """The memory cap cannot be met (or was about to be exceeded)."""


def _status_mb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """Highest resident set size this process has reached (VmHWM, else ru_maxrss).

    Linux refreshes VmHWM lazily (when memory is unmapped), so the current VmRSS can exceed it."""
    value = _status_mb("VmHWM")
    if value is not None:
        return max(value, _status_mb("VmRSS") or 0.0)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else maxrss / 1024.0


def current_rss_mb() -> float:
    """Resident set size now (VmRSS; falls back to the peak where /proc is absent)."""
    value = _status_mb("VmRSS")
    return value if value is not None else peak_rss_mb()
