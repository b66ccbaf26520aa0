"""Strict types for configuration objects (:class:`~replaykit.continual.StrategySpec`,
:class:`~replaykit.avalanche.BufferConfig`): a value of the wrong type, or an option a distillation method does not
take, is a ``ValueError`` naming it, so that e.g. the string ``"False"`` never turns a switch on."""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, fields
from typing import Any

__all__ = ["check_positive_int", "check_type", "method_parameters", "check_method_options", "canonical_json", "checked_fields"]

#: Constructor arguments of a distillation method the buffer sets itself (never from a configuration).
BUFFER_CHOSEN = frozenset({"self", "ipc", "seed", "progress", "learner", "seen"})


def check_positive_int(name: str, value: Any, error: type[Exception] = ValueError, allow_none: bool = False) -> None:
    """Reject anything but an int >= 1 (a bool is no int: ``True`` is not a factor of 1); ``error`` names ``name``."""
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise error(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def check_type(key: str, value: Any, kind: type) -> None:
    """Reject a value of the wrong type: only ``True``/``False`` are bools, a bool is no int, an int is a float."""
    if kind is bool or kind is int:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(f"option {key}={value!r} must be {kind.__name__}, got {type(value).__name__}")


def method_parameters(method: str) -> dict[str, type | None]:
    """Options a configuration may pass to ``method``'s constructor, with the type of each default (None: any).

    Follows ``**options`` to the base class it forwards to (``dm-multi`` takes ``dm``'s options).
    """
    from . import distill, registry

    if method == "auto":  # the buffer takes the method and its options from replaykit.memory_choice
        return {}
    method_cls = registry.lookup(distill.REGISTRY, method, "distillation method")
    # a selecting method's picks go through the buffer's stored form like distilled images (its twins)
    params: dict[str, type | None] = {"factor": int, "bits": int} if method_cls.selects else {}
    for cls in method_cls.__mro__:
        if "__init__" not in vars(cls):
            continue
        forwards = False
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif p.kind is not p.VAR_POSITIONAL and p.name not in BUFFER_CHOSEN and p.name not in params:
                default = p.default
                params[p.name] = None if default is p.empty or default is None else type(default)
        if not forwards:
            break
    return params


def check_method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for ``method``'s constructor, checked (an option it lacks, or a value of the wrong type, is named);
    the copy returned holds a float option given as an int as a float."""
    params = method_parameters(method)
    checked = {}
    for key, value in options.items():
        if key not in params:
            raise ValueError(f"method {method!r} has no option {key!r}; it takes {sorted(params)}")
        if params[key] is not None:
            check_type(key, value, params[key])
        checked[key] = float(value) if params[key] is float else value
    return checked


def canonical_json(obj: Any) -> str:
    """A dataclass as sorted, compact JSON: equal exactly when every field is equal (a run's or a buffer's identity)."""
    return json.dumps(asdict(obj), sort_keys=True, separators=(",", ":"))


def checked_fields(cls: type, data: Any) -> dict[str, Any]:
    """``data`` (a JSON object) as keyword arguments of dataclass ``cls``; a key ``cls`` lacks is a ``ValueError`` naming it."""
    if not isinstance(data, dict):
        raise ValueError(f"a {cls.__name__} is a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    return dict(data)
