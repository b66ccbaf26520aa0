"""Images held as grey levels: uint8 pixels, or ``2**bits`` levels packed ``8 // bits`` to a byte (bits 1, 2, 4)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .base import BufferFormatError, Codec, Codes, normalisation

__all__ = ["GreyLevels", "PIXEL_BITS", "check_pixel_bits", "pack_levels", "unpack_levels"]

PIXEL_BITS = (1, 2, 4, 8)


def check_pixel_bits(bits: Any) -> int:
    """Validate ``meta["pixel_bits"]``: uint8 storage keeps ``2**bits`` grey levels per pixel, packed ``8 // bits`` to a byte."""
    bits = 8 if bits is None else bits
    if bits not in PIXEL_BITS or isinstance(bits, bool):
        raise BufferFormatError(f"pixel_bits must be one of {PIXEL_BITS}, got {bits!r}")
    return int(bits)


def pack_levels(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """``[N, ...]`` uint8 grey levels below ``2**bits`` -> ``[N, ceil(D * bits / 8)]`` bytes (D values per row)."""
    flat = levels.reshape(levels.shape[0], -1).to(torch.int64)
    if bits == 8:
        return flat.to(torch.uint8)
    per_byte = 8 // bits
    pad = (-flat.shape[1]) % per_byte
    flat = torch.nn.functional.pad(flat, (0, pad)).view(flat.shape[0], -1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int64) * bits
    return (flat << shifts).sum(-1).to(torch.uint8)


def unpack_levels(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_levels`: ``[N, B]`` bytes -> ``[N, count]`` uint8 grey levels."""
    if bits == 8:
        return packed[:, :count].to(torch.uint8)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int64) * bits
    values = (packed.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1)[:, :count].to(torch.uint8)


class GreyLevels(Codec):
    """Pixels (normalisation undone, clipped to [0, 1]) rounded to ``2**bits - 1`` levels; 8 bits are plain uint8
    ``[N, C, H, W]``, fewer are packed into ``[N, ceil(C*H*W*bits/8)]`` byte rows (each image padded to whole bytes)."""

    name = storage = "uint8"
    rank = 30
    stores_pixels = True

    def __init__(self, bits: int = 8, mean: Any = None, std: Any = None) -> None:
        self.bits = check_pixel_bits(bits)
        self.mean, self.std = normalisation(mean, std)

    @property
    def maximum(self) -> int:
        return 2 ** self.bits - 1

    # the pixel-space halves, which a pixel-space downsampling composes with
    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        return (images * self.std + self.mean).clamp_(0.0, 1.0)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def encode_pixels(self, pixels: torch.Tensor, header: torch.Tensor | None = None) -> Codes:
        levels = (pixels * self.maximum).round_().to(torch.uint8)
        return Codes(levels if self.bits == 8 else pack_levels(levels, self.bits))

    def decode_pixels(self, codes: Codes, shape: Sequence[int]) -> torch.Tensor:
        bodies = codes.bodies
        stacked = bodies if isinstance(bodies, torch.Tensor) else torch.stack(list(bodies))
        if self.bits < 8:
            stacked = unpack_levels(stacked, self.bits, int(math.prod(shape))).reshape(-1, *shape)
        return stacked.float() / self.maximum

    def encode(self, images: torch.Tensor, header: torch.Tensor | None = None) -> Codes:
        return self.encode_pixels(self.to_pixels(images))

    def decode(self, codes: Codes, shape: Sequence[int]) -> torch.Tensor:
        return self.normalise(self.decode_pixels(codes, shape))

    def roundtrip(self, images: torch.Tensor) -> torch.Tensor:  # the levels without packing them
        return self.normalise((self.to_pixels(images) * self.maximum).round_() / self.maximum)

    def image_nbytes(self, shape: Sequence[int]) -> int:
        return math.ceil(int(math.prod(int(v) for v in shape)) * self.bits / 8)

    def unpack(self, stored: torch.Tensor, count: int, shape: Sequence[int], header_bytes: int = 0) -> Codes:
        if stored.dtype != torch.uint8:
            raise BufferFormatError(f"images stored as {stored.dtype}, expected 'uint8'")
        if self.bits < 8:
            if not (len(shape) == 3 and stored.ndim == 2):
                raise BufferFormatError(f"packed {self.bits}-bit images need a [N, bytes] tensor and an image_shape in the header")
            if stored.shape[1] != self.image_nbytes(shape):
                raise BufferFormatError(f"packed rows of {stored.shape[1]} bytes do not hold {list(shape)} pixels at {self.bits} bits")
        return Codes(stored)

    def meta(self) -> dict[str, Any]:
        return {"pixel_bits": self.bits} if self.bits < 8 else {}
