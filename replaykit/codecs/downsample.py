"""Images held at ``1/factor`` of the network's resolution (average-pooled), decoded by bilinear upsampling.

A composition: the held images go through another codec (``inner``: floats, grey levels, JPEG), so
``Downsample(2, GreyLevels(bits=2))`` holds MNIST digits as 14x14 four-level images, 49 bytes each.
The decoder is ``{"kind": "upsample", "factor": f, "mode": "bilinear"}`` in a buffer's metadata (IDC's
multi-formation, Kim et al. 2022): ``torch.nn.functional.interpolate(scale_factor=f, mode="bilinear",
align_corners=False)``, which the edge device applies in numpy.

``space="normalised"`` (the default; how buffers hold distilled images) pools and upsamples the normalised
images; ``space="pixels"`` (the compressed real-exemplar baseline) pools the clipped [0, 1] pixels before the
inner codec's rounding and upsamples pixels before normalising them again.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import BufferFormatError, Codec, Codes
from ..typed import check_positive_int

__all__ = ["Downsample", "check_decoder", "decoder_meta", "upsample"]

SPACES = ("normalised", "pixels")


def decoder_meta(factor: int) -> dict[str, Any]:
    """The metadata entry of images held at ``1/factor`` resolution (``meta["decoder"]``; also what the edge manifest carries)."""
    return {"kind": "upsample", "factor": int(factor), "mode": "bilinear"}


def check_decoder(decoder: Any) -> int:
    """Validate ``meta["decoder"]`` and return its upsampling factor (1: stored at full resolution)."""
    if decoder is None:
        return 1
    if not isinstance(decoder, dict) or decoder.get("kind") != "upsample" or decoder.get("mode", "bilinear") != "bilinear":
        raise BufferFormatError(f"unknown decoder {decoder!r}; expected {{'kind': 'upsample', 'factor': f, 'mode': 'bilinear'}}")
    factor = decoder.get("factor")
    check_positive_int("decoder factor", factor, BufferFormatError)
    return factor


def upsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Differentiable decoder of low-resolution images: bilinear upsampling by ``factor``."""
    if factor == 1:
        return images
    return torch.nn.functional.interpolate(images, scale_factor=factor, mode="bilinear", align_corners=False)


class Downsample(Codec):
    """``inner`` applied to the images average-pooled by ``factor``; decoded by bilinear upsampling."""

    name = "downsample"
    rank = 1000  # a composition: not a storage of its own

    def __init__(self, factor: int = 2, inner: Codec | None = None, space: str = "normalised") -> None:
        check_positive_int("factor", factor)
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if inner is None:
            from .levels import GreyLevels

            inner = GreyLevels()
        if space == "pixels" and not inner.stores_pixels:
            raise ValueError(f"space='pixels' needs a pixel codec (grey levels, JPEG), not {type(inner).__name__}")
        self.factor, self.inner, self.space = factor, inner, space

    @property
    def storage(self) -> str:  # type: ignore[override]
        return self.inner.storage

    @property
    def element(self) -> Codec:
        return self.inner

    def held_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        c, h, w = (int(v) for v in shape)
        if h % self.factor or w % self.factor:
            raise ValueError(f"decoder factor {self.factor} does not divide the image size {h}x{w}")
        return c, h // self.factor, w // self.factor

    def shrink(self, images: torch.Tensor) -> torch.Tensor:
        """Full resolution -> held resolution."""
        return torch.nn.functional.avg_pool2d(images, self.factor) if self.factor > 1 else images

    def expand(self, held: torch.Tensor) -> torch.Tensor:
        """Held resolution -> the network's (the decoder)."""
        return upsample(held, self.factor)

    def encode(self, images: torch.Tensor, header: torch.Tensor | None = None) -> Codes:
        self.held_shape(images.shape[1:])
        if self.space == "pixels":
            return self.inner.encode_pixels(self.shrink(self.inner.to_pixels(images)), header)  # type: ignore[attr-defined]
        return self.inner.encode(self.shrink(images), header)

    def decode(self, codes: Codes, shape: Sequence[int]) -> torch.Tensor:
        held = self.held_shape(shape)
        if self.space == "pixels":
            inner: Any = self.inner
            return inner.normalise(self.expand(inner.decode_pixels(codes, held)))
        return self.expand(self.inner.decode(codes, held))

    def image_nbytes(self, shape: Sequence[int]) -> int | None:
        return self.inner.image_nbytes(self.held_shape(shape))

    def pack(self, codes: Codes) -> torch.Tensor:
        return self.inner.pack(codes)

    def unpack(self, stored: torch.Tensor, count: int, shape: Sequence[int], header_bytes: int = 0) -> Codes:
        return self.inner.unpack(stored, count, self.held_shape(shape), header_bytes)

    def header_nbytes(self, stored: torch.Tensor) -> int:
        return self.inner.header_nbytes(stored)

    def view(self, images: torch.Tensor) -> torch.Tensor | None:
        """Pooled, through ``inner``'s view (JPEG), upsampled; ``None`` at factor 1 with nothing to imitate, or
        when the factor does not divide the images."""
        f = self.factor
        small = self.shrink(images) if f > 1 and not (images.shape[-1] % f or images.shape[-2] % f) else None
        if f > 1 and small is None:
            return None
        inner = self.inner.view(images if small is None else small)
        if inner is None and small is None:
            return None
        return self.expand(small if inner is None else inner)

    def meta(self) -> dict[str, Any]:
        return {**({"decoder": decoder_meta(self.factor)} if self.factor > 1 else {}), **self.inner.meta()}

    def __repr__(self) -> str:
        return f"Downsample({self.factor}, {self.inner!r}, space={self.space!r})"
