"""Progress bars that keep logs small: every bar in ReplayKit, ``edge`` and the benchmarks comes from here.

On a terminal a bar redraws as tqdm always does. When its stream is not a terminal (a log file,
a pipe, a CI capture) it redraws at most once a second and stays silent for work that ends within
a second, so nested bars cannot write a line per iteration into a log. A disabled bar is a silent
stand-in that never imports tqdm: the device runtime may lack tqdm, and importing it in the middle
of ``edge.Retrainer.fit`` would grow the process past a memory cap set just before.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Iterable, TextIO

__all__ = ["LOG_REFRESH_SECONDS", "is_terminal", "progress_bar"]

# Off a terminal: seconds between redraws, and seconds of work before the first one.
LOG_REFRESH_SECONDS = 1.0


def is_terminal(stream: TextIO | None) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and closed streams)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except (ValueError, OSError):  # closed or detached stream
        return False


class _SilentBar:
    """Stand-in for a tqdm bar (disabled, or tqdm not installed): iterates, prints nothing."""

    def __init__(self, iterable: Iterable | None = None) -> None:
        self._iterable = iterable

    def __iter__(self):
        return iter(() if self._iterable is None else self._iterable)

    def __enter__(self) -> "_SilentBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        """No-op."""

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """No-op."""

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        """No-op."""

    def close(self) -> None:
        """No-op."""


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **tqdm_kwargs: Any):
    """A tqdm bar over ``iterable`` (or with ``total=``) that is rate-limited when not on a terminal.

    ``enabled=False`` gives a bar that prints nothing. Other keyword arguments go to tqdm; an
    explicit ``mininterval`` or ``delay`` wins over the log-friendly defaults.
    """
    if not enabled:
        return _SilentBar(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional on a device
        return _SilentBar(iterable)
    if is_terminal(tqdm_kwargs.get("file") or sys.stderr):
        return tqdm(iterable, **tqdm_kwargs)
    tqdm_kwargs.setdefault("mininterval", LOG_REFRESH_SECONDS)
    tqdm_kwargs.setdefault("delay", LOG_REFRESH_SECONDS)
    return _rate_limited(tqdm)(iterable, **tqdm_kwargs)


@functools.cache
def _rate_limited(tqdm: type) -> type:
    """``tqdm`` whose postfix / description changes wait for the next timed redraw.

    tqdm redraws on every ``set_postfix`` call, whatever ``mininterval`` says: that, once per
    iteration, is what filled logs with a line per DM iteration.
    """

    class RateLimitedBar(tqdm):
        def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs: Any) -> None:
            super().set_postfix(ordered_dict, refresh=False, **kwargs)

        def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
            super().set_postfix_str(s, refresh=False)

        def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
            super().set_description(desc, refresh=False)

        def set_description_str(self, desc: str | None = None, refresh: bool = True) -> None:
            super().set_description_str(desc, refresh=False)

    return RateLimitedBar
