"""JPEG as a replay-buffer codec, with the headers held once.

torchvision writes every image of one size and quality with the same headers and tables
(about 330 of the ~490 bytes of a 28x28 MNIST image at quality 50), so a buffer holds them
once and keeps only each image's entropy-coded body. Bodies end with the EOI marker, so
they can be concatenated and split again without storing lengths.
"""

from __future__ import annotations

import torch

__all__ = ["encode", "decode", "split_bodies", "header_length", "quant_table", "simulate"]

#: libjpeg's luminance quantisation table at quality 50 (ITU T.81, Annex K), in natural order.
_LUMINANCE_BASE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)


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


def quant_table(quality: int) -> torch.Tensor:
    """``[8, 8]`` luminance quantisation steps libjpeg uses at ``quality`` (its scaling, baseline-clamped to 1-255)."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must lie in [1, 100], got {quality!r}")
    quality = int(quality)
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    base = torch.tensor(_LUMINANCE_BASE, dtype=torch.int64)
    return ((base * scale + 50) // 100).clamp(1, 255).view(8, 8).double().float()


def _dct_matrix() -> torch.Tensor:
    n = torch.arange(8, dtype=torch.float64)
    basis = torch.cos((2 * n[None, :] + 1) * n[:, None] * torch.pi / 16) * (2 / 8) ** 0.5
    basis[0] /= 2 ** 0.5
    return basis.float()


def _straight_through_round(x: torch.Tensor) -> torch.Tensor:
    return x + (x.round() - x).detach()


def simulate(pixels: torch.Tensor, quality: int) -> torch.Tensor:
    """What a grey-level JPEG at ``quality`` gives back for ``[N, 1, H, W]`` pixels in ``[0, 1]``, differentiably.

    The baseline codec's lossy steps: level shift, edge-replicated padding to whole 8x8 blocks, the
    orthonormal 8x8 DCT, division by :func:`quant_table` and rounding, then the way back and rounding to
    8-bit pixels. Roundings are straight-through, so a distiller can learn images *for* the codec.
    libjpeg's integer DCT differs from this float one by at most a quantisation step on rare coefficients.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 1:
        raise ValueError(f"JPEG simulation covers grey-level [N, 1, H, W] images, got {tuple(pixels.shape)}")
    n, _, h, w = pixels.shape
    x = _straight_through_round(pixels.clamp(0, 1) * 255) - 128
    x = torch.nn.functional.pad(x, (0, (-w) % 8, 0, (-h) % 8), mode="replicate")
    bh, bw = x.shape[-2] // 8, x.shape[-1] // 8
    blocks = x.view(n, bh, 8, bw, 8).permute(0, 1, 3, 2, 4)  # [N, bh, bw, 8, 8]
    dct, table = _dct_matrix(), quant_table(quality)
    levels = _straight_through_round(dct @ blocks @ dct.T / table)
    back = (dct.T @ (levels * table) @ dct).permute(0, 1, 3, 2, 4).reshape(n, 1, bh * 8, bw * 8)
    out = (back[..., :h, :w] + 128).clamp(0, 255)
    return _straight_through_round(out) / 255
