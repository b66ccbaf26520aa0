"""Avalanche checkpoints that resume to the same run: torch optimizers made picklable by dill.

Avalanche 0.6's ``save_checkpoint`` pickles the whole strategy with dill. With recent torch, dill cannot find
``torch.optim.SGD`` at ``torch.optim.sgd.SGD`` (the package no longer exposes its submodules), so it tries to pickle
the class by value and fails (``Can't pickle sentinel``). Leaving the optimizer out (``exclude=["optimizer"]``)
loses its momentum, which Avalanche keeps from one experience to the next, so a resumed run would drift from the
uninterrupted one. Registering a reducer that names the class and pickles the optimizer's own state
(``__getstate__``: defaults, state, param groups, whose tensors are the model's parameters in the same pickle)
makes the checkpoint whole. Imported by :mod:`replaykit.avalanche`; the checkpoint is the user's own local file.
"""

from __future__ import annotations

import importlib
from typing import Any

import dill
import torch

__all__ = ["register_optimizers"]


def _rebuild_optimizer(module: str, qualname: str, state: dict[str, Any]) -> torch.optim.Optimizer:
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"{module}.{qualname} is not a torch optimizer")
    optimizer = cls.__new__(cls)
    optimizer.__setstate__(state)
    return optimizer


def _save_optimizer(pickler: Any, obj: torch.optim.Optimizer) -> None:
    cls = type(obj)
    pickler.save_reduce(_rebuild_optimizer, (cls.__module__, cls.__qualname__, obj.__getstate__()), obj=obj)


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def register_optimizers() -> None:
    """Pickle every torch optimizer class defined so far by name (idempotent; call again after defining new ones)."""
    for cls in _subclasses(torch.optim.Optimizer):
        dill.register(cls)(_save_optimizer)


register_optimizers()
