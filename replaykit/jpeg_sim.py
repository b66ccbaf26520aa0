"""A differentiable stand-in for baseline JPEG, so a distiller can learn images for the codes the buffer will hold.

A buffer that stores JPEG at quality 2 keeps little more than each 8x8 block's mean: images distilled
in full precision and JPEG-coded afterwards lose most of what distillation put in them. Running the
matching through this simulation (colour transform, 4:2:0 chroma averaging, 8x8 DCT, quantisation by
libjpeg's tables for the quality, straight-through rounding, inverse) lets the optimiser see what
survives the codec, the way ``bits`` does for packed grey levels.

It follows libjpeg (what Pillow writes and decodes; :mod:`replaykit.jpeg`) closely but not bit for bit
(float DCT instead of the integer one, bilinear chroma upsampling for libjpeg's "fancy" one): the
buffer still stores Pillow's codes, and the tests bound the gap.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["quant_tables", "simulate_jpeg"]

#: libjpeg's base tables (ITU-T T.81 Annex K), row-major, for quality 50.
_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
         14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_CHROMA = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
           47, 66, 99, 99, 99, 99, 99, 99, *([99] * 32))


def quant_tables(quality: int) -> tuple[torch.Tensor, torch.Tensor]:
    """libjpeg's luma and chroma quantisation tables ``[8, 8]`` at ``quality`` (baseline: entries in [1, 255]).

    Built once per quality (a distiller codes every iteration): the tensors are shared, callers must not modify them."""
    if not (isinstance(quality, int) and 1 <= quality <= 100):
        raise ValueError(f"JPEG quality must be an int in [1, 100], got {quality!r}")
    return _tables(int(quality))


@lru_cache(maxsize=None)
def _tables(quality: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    tables = []
    for base in (_LUMA, _CHROMA):
        entries = [min(255, max(1, (b * scale + 50) // 100)) for b in base]
        tables.append(torch.tensor(entries, dtype=torch.float32).view(8, 8))
    return tables[0], tables[1]


@lru_cache(maxsize=None)
def _dct_matrix(device: torch.device) -> torch.Tensor:
    """The orthonormal 8-point DCT-II (JPEG's forward transform is this, applied to rows and columns)."""
    k = torch.arange(8, dtype=torch.float32, device=device)
    m = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m


def _round_st(x: torch.Tensor) -> torch.Tensor:
    """Rounding whose gradient is the identity (straight-through)."""
    return x + (x.round() - x).detach()


def _code_plane(plane: torch.Tensor, table: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` samples in [0, 255] -> the same after 8x8 DCT, quantisation and inverse (edge-padded to 8)."""
    n, h, w = plane.shape
    ph, pw = -h % 8, -w % 8
    if ph or pw:  # libjpeg replicates the last row / column into partial blocks
        plane = F.pad(plane[:, None], (0, pw, 0, ph), mode="replicate")[:, 0]
    hb, wb = plane.shape[1] // 8, plane.shape[2] // 8
    blocks = (plane - 128).view(n, hb, 8, wb, 8).permute(0, 1, 3, 2, 4)  # [N, hb, wb, 8, 8]
    coeffs = dct @ blocks @ dct.T
    table = table.to(plane.device)
    coeffs = _round_st(coeffs / table) * table
    out = (dct.T @ coeffs @ dct).permute(0, 1, 3, 2, 4).reshape(n, hb * 8, wb * 8) + 128
    return out[:, :h, :w]


def simulate_jpeg(pixels: torch.Tensor, quality: int) -> torch.Tensor:
    """``[N, C, H, W]`` pixels in [0, 255] (C = 1 grey or 3 RGB) -> what JPEG at ``quality`` decodes them to, differentiably.

    The output is clamped to [0, 255] but not rounded: the caller decides (a distiller keeps the gradient).
    """
    if pixels.ndim != 4 or pixels.shape[1] not in (1, 3):
        raise ValueError(f"simulate_jpeg needs [N, 1 or 3, H, W] pixels, got {tuple(pixels.shape)}")
    luma_table, chroma_table = quant_tables(quality)
    dct = _dct_matrix(pixels.device)
    x = pixels.clamp(0, 255)
    if pixels.shape[1] == 1:
        return _code_plane(x[:, 0], luma_table, dct)[:, None].clamp(0, 255)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    h, w = y.shape[1:]
    chroma = []
    for plane in (cb, cr):  # 4:2:0: 2x2 means, coded at half resolution, upsampled back
        small = F.avg_pool2d(F.pad(plane[:, None], (0, w % 2, 0, h % 2), mode="replicate"), 2)[:, 0]
        coded = _code_plane(small, chroma_table, dct)
        chroma.append(F.interpolate(coded[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0, :h, :w])
    y = _code_plane(y, luma_table, dct)
    cb, cr = chroma[0] - 128, chroma[1] - 128
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], dim=1)
    return rgb.clamp(0, 255)
