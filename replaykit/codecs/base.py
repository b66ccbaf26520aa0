"""The one interface every image codec implements, and what a held image costs besides its pixels.

A codec turns normalised images ``[N, C, H, W]`` into what a buffer stores (:class:`Codes`: bytes
every image shares, held once, and one body per image) and back. Fixed-size codecs (floats, grey
levels) keep their bodies as one stacked tensor; JPEG keeps a list of variable-length bodies.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

__all__ = ["Codec", "Codes", "BufferFormatError", "label_row_bytes", "logit_row_bytes", "normalisation"]


class BufferFormatError(ValueError):
    """A buffer (in memory or on disk) is malformed, corrupt or tampered with."""


def logit_row_bytes(num_classes: int) -> int:
    """Bytes one image's held logits take: an int8 per class and a float16 scale."""
    return int(num_classes) + 2


def label_row_bytes(soft_classes: int = 0, logit_classes: int = 0, soft_bytes: int = 2) -> int:
    """Bytes one held image costs besides its pixels: a one-byte label (hard) or class id (soft), a soft-label
    row of ``soft_classes`` values at ``soft_bytes`` each, and held logits over ``logit_classes`` classes."""
    return 1 + soft_bytes * int(soft_classes) + (logit_row_bytes(logit_classes) if logit_classes else 0)


def normalisation(mean: Any, std: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` / ``std`` (sequences or tensors; ``None``: identity) as ``[1, C, 1, 1]`` float32 tensors."""
    mean = torch.zeros(1) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
    std = torch.ones(1) if std is None else torch.as_tensor(std, dtype=torch.float32)
    return mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)


def _empty_header() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.uint8)


@dataclass
class Codes:
    """What a buffer stores for its images: ``header`` (uint8 bytes shared by every image, counted once;
    empty for most codecs) and ``bodies`` (one per image: a stacked tensor or a list of tensors)."""

    bodies: Sequence[torch.Tensor]
    header: torch.Tensor = field(default_factory=_empty_header)

    def __len__(self) -> int:
        return len(self.bodies)


class Codec(abc.ABC):
    """Normalised images <-> what a buffer stores.

    ``encode`` / ``decode`` work at the *held* resolution; a composition with :class:`~replaykit.codecs.downsample.Downsample`
    holds images at ``1/factor`` of the network's and decodes them back (:meth:`expand`). Subclasses set
    ``name`` (registry key) and ``storage`` (the value a buffer file's header names it by).
    """

    name: ClassVar[str] = ""
    storage: ClassVar[str] = ""
    #: position in :func:`replaykit.codecs.storages` (the order storages are listed in messages)
    rank: ClassVar[int] = 100
    #: dtype of the tensor a buffer file holds for the codes
    dtype: ClassVar[torch.dtype] = torch.uint8
    #: the codes must be kept with the images they decode to: encoding decoded images again changes them (JPEG)
    holds_codes: ClassVar[bool] = False
    #: stores pixels (normalisation undone): encoding and decoding need the dataset's mean / std
    stores_pixels: ClassVar[bool] = False
    #: decode(encode(x)) is x itself
    lossless: ClassVar[bool] = False
    #: decoder factor from the held to the network's resolution
    factor: int = 1

    @property
    def element(self) -> "Codec":
        """The codec that works at the held resolution (itself, unless this is a composition)."""
        return self

    @abc.abstractmethod
    def encode(self, images: torch.Tensor, header: torch.Tensor | None = None) -> Codes:
        """Normalised float32 images -> codes (``header``: reuse a shared header already held)."""

    @abc.abstractmethod
    def decode(self, codes: Codes, shape: Sequence[int]) -> torch.Tensor:
        """Codes of images of ``shape`` (C, H, W) -> normalised float32 ``[N, *shape]``."""

    def roundtrip(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` as this codec gives them back."""
        return self.decode(self.encode(images), images.shape[1:])

    def image_nbytes(self, shape: Sequence[int]) -> int | None:
        """Bytes one image of ``shape`` takes, or ``None`` when that depends on its content (JPEG)."""
        return None

    @staticmethod
    def body_nbytes(body: torch.Tensor) -> int:
        return int(body.numel()) * body.element_size()

    def nbytes(self, codes: Codes) -> int:
        """Bytes the codes take: the shared header once plus every body."""
        bodies = codes.bodies
        total = self.body_nbytes(bodies) if isinstance(bodies, torch.Tensor) else sum(self.body_nbytes(b) for b in bodies)
        return int(codes.header.numel()) + total

    def pack(self, codes: Codes) -> torch.Tensor:
        """The one tensor a buffer file holds for the codes."""
        bodies = codes.bodies
        return (bodies if isinstance(bodies, torch.Tensor) else torch.stack(list(bodies))).contiguous()

    def unpack(self, stored: torch.Tensor, count: int, shape: Sequence[int], header_bytes: int = 0) -> Codes:
        """Inverse of :meth:`pack`; a tensor that cannot hold ``count`` images of ``shape`` raises :class:`BufferFormatError`."""
        return Codes(stored)

    def header_nbytes(self, stored: torch.Tensor) -> int:
        """Length of the shared header at the front of a packed tensor (0: none)."""
        return 0

    def view(self, images: torch.Tensor) -> torch.Tensor | None:
        """Normalised images as the buffer gives them back, for mixed training; ``None`` when storing changes
        nothing a learner could pick up (floats and grey levels at full resolution)."""
        return None

    def meta(self) -> dict[str, Any]:
        """The keys a buffer's metadata (and a bundle manifest) carries for this codec."""
        return {}

    def manifest(self, stored: torch.Tensor) -> dict[str, Any]:
        """The image entries of an edge bundle's manifest for ``stored`` (what :meth:`pack` gave): how the device decodes them."""
        meta = self.meta()
        return {"image_storage": self.storage, "decoder": meta.get("decoder"), "pixel_bits": meta.get("pixel_bits", 8),
                "jpeg_header_bytes": self.header_nbytes(stored), "jpeg_quality": meta.get("jpeg_quality")}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.meta().items())
        return f"{type(self).__name__}({options})"
