"""Distillation methods and selection baselines behind one interface and one registry.

>>> from replaykit import distill
>>> distill.available()                      # doctest: +SKIP
['boundary', 'dm', 'dm-multi', 'gm', 'herding', 'kcenter', 'krr', 'random', 'recode', 'tm']
>>> buffer = distill.make("dm", ipc=10).distill(images, labels)   # doctest: +SKIP
"""

from __future__ import annotations

from .. import registry as _registry
from .base import DistillResult, Distiller, check_training_data
from .boundary import BoundaryAnchors
from .dm import DistributionMatching
from .dm_multi import MultiLayerDistributionMatching
from .herding import Herding
from .kcenter import KCenter
from .gm import GradientMatching
from .krr import KernelRidgeDistiller
from .random_subset import RandomSubset
from .recode import Recode
from .tm import TrajectoryMatching

__all__ = ["Distiller", "DistillResult", "check_training_data", "available", "make", "register", "REGISTRY"]

#: Method name -> class. Add a method by decorating its class with :func:`register`.
REGISTRY: dict[str, type[Distiller]] = {}


def register(cls: type[Distiller]) -> type[Distiller]:
    """Class decorator: add a distiller to the registry under ``cls.name``."""
    return _registry.add(REGISTRY, cls, "distiller")


def available() -> list[str]:
    """Sorted registry names."""
    return sorted(REGISTRY)


def make(name: str, **options) -> Distiller:
    """Build the distiller registered as ``name`` with ``options`` for its ``__init__``.

    A registered class written before ``device=`` existed still builds with ``device="cpu"`` (dropped:
    it runs on the CPU anyway); asking it for another device raises ``ValueError`` naming it.
    """
    cls = _registry.lookup(REGISTRY, name, "distillation method")
    if "device" in options and not _takes(cls, "device"):
        from ..device import resolve_device

        if resolve_device(options["device"]).type != "cpu":
            raise ValueError(f"method {name!r} ({cls.__name__}) takes no device: it runs on the CPU only")
        options.pop("device")
    return cls(**options)


def _takes(cls: type, option: str) -> bool:
    """Whether ``cls(...)`` accepts keyword ``option`` (named, or through ``**kwargs``)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters.values()
    return any(p.name == option or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


for _cls in (RandomSubset, DistributionMatching, MultiLayerDistributionMatching, Herding, KCenter, GradientMatching, KernelRidgeDistiller, TrajectoryMatching, Recode,
             BoundaryAnchors):
    register(_cls)
