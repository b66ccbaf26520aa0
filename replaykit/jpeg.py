"""JPEG as a replay-buffer codec, with the headers held once.

torchvision writes every image of one size and quality with the same headers and tables
(about 330 of the ~490 bytes of a 28x28 MNIST image at quality 50), so a buffer holds them
once and keeps only each image's entropy-coded body. Bodies end with the EOI marker, so
they can be concatenated and split again without storing lengths.
"""

from __future__ import annotations

import torch

__all__ = ["encode", "decode", "split_bodies", "header_length", "roundtrip"]


def header_length(code: torch.Tensor) -> int:
    """Bytes up to the end of the start-of-scan segment: everything but the entropy-coded image data."""
    data = bytes(code.tolist())
    pos = 2  # after SOI
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
        pos += 2 + length
        if marker == 0xDA:  # start of scan
            return pos
    raise ValueError("not a baseline JPEG file: no start-of-scan segment")


def encode(pixels: torch.Tensor, quality: int, header: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``[N, C, H, W]`` uint8 pixels -> (shared header, one body per image).

    Raises ``RuntimeError`` if an image's headers differ from ``header`` (or from the first image's).
    """
    from torchvision.io import encode_jpeg

    if pixels.dtype != torch.uint8 or pixels.ndim != 4:
        raise ValueError(f"JPEG encoding needs [N, C, H, W] uint8 pixels, got {pixels.dtype} {tuple(pixels.shape)}")
    codes = [encode_jpeg(p.contiguous(), quality=int(quality)) for p in pixels]
    if header is None:
        header = codes[0][: header_length(codes[0])].clone()
    n = header.numel()
    for code in codes:
        if code.numel() <= n or not torch.equal(code[:n], header):
            raise RuntimeError("torchvision wrote JPEG headers that differ between images of one size and quality")
    return header, [code[n:].clone() for code in codes]


def decode(header: torch.Tensor, bodies: list[torch.Tensor], channels: int) -> torch.Tensor:
    """(shared header, bodies) -> ``[N, C, H, W]`` uint8 pixels."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    return torch.stack([decode_jpeg(torch.cat([header, body]), mode=mode) for body in bodies])


def split_bodies(data: torch.Tensor) -> list[torch.Tensor]:
    """Concatenated bodies -> one tensor each, cut after every EOI marker (0xFF 0xD9)."""
    ends = torch.nonzero((data[:-1] == 0xFF) & (data[1:] == 0xD9)).flatten() + 2
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), ends[:-1]])
    return [data[s:e] for s, e in zip(starts.tolist(), ends.tolist())]


def roundtrip(images: torch.Tensor, quality: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised ``[N, C, H, W]`` images as JPEG at ``quality`` gives them back (still normalised).

    ``mean`` / ``std`` broadcast against ``images`` (e.g. ``[1, C, 1, 1]``); pixels are clamped to [0, 1]
    and rounded to uint8 first, as a buffer stores them.
    """
    pixels = ((images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    header, bodies = encode(pixels, quality)
    return (decode(header, bodies, images.shape[1]).float() / 255.0 - mean) / std
