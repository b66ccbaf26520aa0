"""The name -> class tables behind ``replaykit.distill`` and ``replaykit.codecs``: one way to add and look up."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["add", "lookup"]

T = TypeVar("T", bound=type)


def add(table: dict[str, T], cls: T, noun: str) -> T:
    """Put ``cls`` in ``table`` under ``cls.name``; a missing name, or a name another class holds, is a ``ValueError``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no registry name")
    if cls.name in table and table[cls.name] is not cls:
        raise ValueError(f"a {noun} named {cls.name!r} is already registered ({table[cls.name].__name__})")
    table[cls.name] = cls
    return cls


def lookup(table: dict[str, T], name: str, noun: str) -> T:
    """The class registered as ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {noun} {name!r}; available: {', '.join(sorted(table))}") from None
