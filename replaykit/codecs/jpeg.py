"""Images held as JPEG at a quality (Pillow, :mod:`replaykit.jpeg`): the headers and tables every image of one
size and quality shares are held once, each image keeps its entropy-coded body (which ends with EOI, so packed
bodies need no lengths)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import jpeg as _jpeg
from .base import BufferFormatError, Codec, Codes, normalisation

__all__ = ["Jpeg", "check_quality"]


def check_quality(quality: Any) -> int:
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
        raise BufferFormatError(f"jpeg_quality must be an int in [1, 100], got {quality!r}")
    return quality


class Jpeg(Codec):
    """Pixels (normalisation undone, clipped, rounded to uint8) JPEG-encoded at ``quality``."""

    name = storage = "jpeg"
    rank = 40
    stores_pixels = True
    holds_codes = True

    def __init__(self, quality: int = 50, mean: Any = None, std: Any = None) -> None:
        self.quality = check_quality(quality)
        self.mean, self.std = normalisation(mean, std)

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        return (images * self.std + self.mean).clamp_(0.0, 1.0)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def encode_pixels(self, pixels: torch.Tensor, header: torch.Tensor | None = None) -> Codes:
        if not len(pixels):
            return Codes([], torch.zeros(0, dtype=torch.uint8) if header is None else header)
        head, bodies = _jpeg.encode((pixels * 255.0).round_().to(torch.uint8), self.quality, header)
        return Codes(bodies, head)

    def decode_pixels(self, codes: Codes, shape: Sequence[int]) -> torch.Tensor:
        if not len(codes):
            return torch.zeros(0, *shape)
        try:
            pixels = _jpeg.decode(codes.header, list(codes.bodies), int(shape[0]))
        except (RuntimeError, _jpeg.JpegError) as exc:
            raise BufferFormatError(f"a stored JPEG image does not decode: {exc}") from exc
        if tuple(pixels.shape[1:]) != tuple(shape):
            raise BufferFormatError(f"JPEG images decode to {tuple(pixels.shape[1:])}, the header says {tuple(shape)}")
        return pixels.float() / 255.0

    def encode(self, images: torch.Tensor, header: torch.Tensor | None = None) -> Codes:
        return self.encode_pixels(self.to_pixels(images), header)

    def decode(self, codes: Codes, shape: Sequence[int]) -> torch.Tensor:
        return self.normalise(self.decode_pixels(codes, shape))

    def pack(self, codes: Codes) -> torch.Tensor:
        """The shared header, then every body."""
        return torch.cat([codes.header] + list(codes.bodies)).contiguous() if len(codes) else codes.header

    def header_nbytes(self, stored: torch.Tensor) -> int:
        return _jpeg.header_length(stored) if stored.numel() else 0

    def unpack(self, stored: torch.Tensor, count: int, shape: Sequence[int], header_bytes: int = 0) -> Codes:
        if stored.dtype != torch.uint8 or stored.ndim != 1 or len(shape) != 3 or not isinstance(header_bytes, int):
            raise BufferFormatError("jpeg storage needs a flat byte tensor, image_shape and jpeg_header_bytes in the header")
        if count == 0:
            return Codes([], torch.zeros(0, dtype=torch.uint8))
        try:
            bodies = _jpeg.split_bodies(stored[header_bytes:])
        except _jpeg.JpegError as exc:
            raise BufferFormatError(str(exc)) from exc
        if len(bodies) != count:
            raise BufferFormatError(f"{len(bodies)} JPEG images for {count} labels")
        return Codes([b.clone() for b in bodies], stored[:header_bytes].clone())

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """The codec runs on the host; the view goes back to the batch's device."""
        return _jpeg.roundtrip(images.cpu(), self.quality, self.mean, self.std).to(images.device)

    def meta(self) -> dict[str, Any]:
        return {"jpeg_quality": self.quality}
