"""Images held as normalised floats: float32 as trained, or rounded to float16 (half the bytes)."""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch

from .base import BufferFormatError, Codec, Codes

__all__ = ["Float32", "Float16"]


class _Floats(Codec):
    dtype: ClassVar[torch.dtype]

    def __init__(self, mean: Any = None, std: Any = None) -> None:  # normalised values: no mean / std needed
        pass

    def encode(self, images: torch.Tensor, header: torch.Tensor | None = None) -> Codes:
        return Codes(images if self.dtype == torch.float32 else images.to(self.dtype))

    def decode(self, codes: Codes, shape: Sequence[int]) -> torch.Tensor:
        bodies = codes.bodies
        stacked = bodies if isinstance(bodies, torch.Tensor) else torch.stack(list(bodies))
        return stacked.float()

    def roundtrip(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.dtype == torch.float32 else images.to(self.dtype).float()

    def image_nbytes(self, shape: Sequence[int]) -> int:
        c, h, w = (int(v) for v in shape)
        return c * h * w * torch.empty(0, dtype=self.dtype).element_size()

    def unpack(self, stored: torch.Tensor, count: int, shape: Sequence[int], header_bytes: int = 0) -> Codes:
        if stored.dtype != self.dtype:
            raise BufferFormatError(f"images stored as {stored.dtype}, expected {self.storage!r}")
        return Codes(stored)


class Float32(_Floats):
    """The images as they are: 4 bytes a value."""

    name = storage = "float32"
    dtype = torch.float32
    rank = 10
    lossless = True


class Float16(_Floats):
    """The images rounded to float16: 2 bytes a value."""

    name = storage = "float16"
    dtype = torch.float16
    rank = 20
