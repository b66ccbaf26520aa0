"""Resident-memory readings for the device process, standard library only."""

from __future__ import annotations

import ctypes
import ctypes.util
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


def release_free_heap() -> None:
    """Hand free malloc memory back to the system (glibc's ``malloc_trim``; a no-op elsewhere), so that
    the resident size the memory planner reads is memory in use, not fragments freed by earlier calls."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = _find_malloc_trim()
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def _find_malloc_trim():
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return False


_MALLOC_TRIM = None
