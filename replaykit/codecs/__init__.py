"""Image codecs behind one interface and one registry: what a replay buffer stores for its images.

>>> from replaykit import codecs
>>> codecs.available()
['downsample', 'float16', 'float32', 'jpeg', 'uint8']
>>> codec = codecs.make("downsample", factor=2, inner=codecs.make("uint8", bits=2, mean=[0.1307], std=[0.3081]))
>>> codec.image_nbytes((1, 28, 28))   # 14x14 pixels at 2 bits
49

Every buffer counts its bytes here: :meth:`Codec.image_nbytes` / :meth:`Codec.nbytes` for the pixels and
:func:`label_row_bytes` for what each image holds besides them. A codec is a :class:`Codec` subclass with a
``name`` in a module of this package: it is found and registered when the package is imported, so adding
one touches its own file (and its test).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Sequence

from .. import registry as _registry
from .base import BufferFormatError, Codec, Codes, label_row_bytes, logit_row_bytes, normalisation
from .downsample import Downsample, check_decoder, decoder_meta, upsample
from .levels import PIXEL_BITS, check_pixel_bits, pack_levels, unpack_levels

__all__ = [
    "Codec", "Codes", "BufferFormatError", "REGISTRY", "available", "make", "register", "storages", "for_storage",
    "compose", "image_cost_bytes", "label_row_bytes", "logit_row_bytes", "normalisation", "Downsample", "check_decoder",
    "decoder_meta", "upsample", "PIXEL_BITS", "check_pixel_bits", "pack_levels", "unpack_levels",
]

#: Codec name -> class.
REGISTRY: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Add a codec class to the registry under ``cls.name`` (the package does this for its own modules)."""
    return _registry.add(REGISTRY, cls, "codec")


def available() -> list[str]:
    """Sorted registry names."""
    return sorted(REGISTRY)


def storages() -> tuple[str, ...]:
    """The storages a buffer file may name (the element codecs, in rank order)."""
    return tuple(cls.storage for cls in sorted(REGISTRY.values(), key=lambda c: c.rank) if cls.storage and cls.name == cls.storage)


def make(name: str, **options: Any) -> Codec:
    """Build the codec registered as ``name`` with ``options`` for its ``__init__``."""
    cls = _registry.lookup(REGISTRY, name, "codec")
    return cls(**options)


def compose(factor: int, inner: Codec, space: str = "normalised") -> Codec:
    """``inner`` on images held at ``1/factor`` resolution (``inner`` itself at factor 1)."""
    return inner if factor == 1 else Downsample(factor, inner, space)


def for_storage(storage: str, *, bits: int = 8, quality: int = 50, factor: int = 1, mean: Any = None, std: Any = None,
                space: str = "normalised") -> Codec:
    """The codec of a buffer held as ``storage`` (``bits``: grey levels of uint8 storage; ``quality``: JPEG's),
    at ``1/factor`` resolution. An unknown storage raises ``ValueError`` naming the known ones."""
    known = storages()
    if storage not in known:
        raise ValueError(f"storage must be one of {known}, got {storage!r}")
    options: dict[str, Any] = {"mean": mean, "std": std}
    params = inspect.signature(REGISTRY[storage].__init__).parameters
    if "bits" in params:
        options["bits"] = bits
    if "quality" in params:
        options["quality"] = quality
    return compose(factor, make(storage, **options), space)


def image_cost_bytes(in_shape: Sequence[int], *, factor: int = 1, storage: str = "uint8", bits: int = 8,
                     soft_classes: int = 0, logit_classes: int = 0) -> int:
    """Bytes one held image costs: its pixels at the stored resolution and precision plus its labels
    (:func:`label_row_bytes`). Only fixed-size storages have a cost per image (JPEG's depends on the image)."""
    codec = for_storage(storage, bits=bits, factor=factor)
    pixels = codec.image_nbytes(in_shape)
    if pixels is None:
        raise ValueError(f"storage {storage!r} has no fixed size per image")
    return pixels + label_row_bytes(soft_classes, logit_classes)


def _discover() -> None:
    """Import every module of this package and register the codec classes it defines."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, Codec) and obj.name and obj.__module__ == module.__name__:
                register(obj)


_discover()
