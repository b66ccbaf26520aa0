"""JPEG as a replay-buffer codec, with the headers held once; Pillow on the host and the device.

Pillow (libjpeg-turbo) writes every image of one size and quality with the same headers and
tables (328 of the ~490 bytes of a 28x28 MNIST image at quality 50), so a buffer holds them
once and keeps only each image's entropy-coded body. Bodies end with the EOI marker, so they
can be concatenated and split again without storing lengths.

The core (``*_arrays`` functions, :func:`header_length`, :func:`split_body_arrays`) needs only
numpy and Pillow: the edge device decodes a bundle's codes with the very same functions, so host
and device pixels agree bit for bit. The torch wrappers (:func:`encode`, :func:`decode`,
:func:`split_bodies`, :func:`roundtrip`) import torch when called. Colour images use 4:2:0 chroma
subsampling, baseline, no Huffman optimisation: byte for byte what torchvision's (deprecated)
``encode_jpeg`` wrote before, so stored sizes did not change with the switch.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # the device never imports torch
    import torch

__all__ = [
    "JpegError", "encode", "decode", "split_bodies", "header_length", "roundtrip",
    "encode_arrays", "decode_arrays", "split_body_arrays",
]

_EOI = (0xFF, 0xD9)


class JpegError(ValueError):
    """Bytes that are not a baseline JPEG this codec wrote, or pixels it cannot encode."""


def _as_bytes(code: "bytes | np.ndarray | torch.Tensor") -> bytes:
    if isinstance(code, (bytes, bytearray, memoryview)):
        return bytes(code)
    if hasattr(code, "numpy"):  # a torch tensor, without importing torch here
        code = code.detach().cpu().numpy()
    return np.ascontiguousarray(code, dtype=np.uint8).tobytes()


def header_length(code: "bytes | np.ndarray | torch.Tensor") -> int:
    """Bytes up to the end of the start-of-scan segment: everything but the entropy-coded image data."""
    data = _as_bytes(code)
    pos = 2  # after SOI
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
        pos += 2 + length
        if marker == 0xDA:  # start of scan
            return pos
    raise JpegError("not a baseline JPEG file: no start-of-scan segment")


def _encode_one(image: np.ndarray, quality: int) -> bytes:
    """``[C, H, W]`` uint8 -> one JPEG file (grey for C=1, RGB 4:2:0 for C=3)."""
    from PIL import Image

    channels = image.shape[0]
    if channels == 1:
        picture = Image.fromarray(np.ascontiguousarray(image[0]), mode="L")
        options = {}
    elif channels == 3:
        picture = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), mode="RGB")
        options = {"subsampling": 2}  # 4:2:0, libjpeg's default
    else:
        raise JpegError(f"JPEG holds 1 (grey) or 3 (RGB) channels, got {channels}")
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=int(quality), optimize=False, progressive=False, **options)
    return out.getvalue()


def encode_arrays(pixels: np.ndarray, quality: int, header: bytes | None = None) -> tuple[bytes, list[bytes]]:
    """``[N, C, H, W]`` uint8 pixels -> (shared header, one body per image), numpy + Pillow only.

    Raises ``RuntimeError`` if an image's headers differ from ``header`` (or from the first image's).
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 4:
        raise ValueError(f"JPEG encoding needs [N, C, H, W] uint8 pixels, got {pixels.dtype} {tuple(pixels.shape)}")
    if not (isinstance(quality, (int, np.integer)) and 1 <= int(quality) <= 100):
        raise ValueError(f"JPEG quality must be an int in [1, 100], got {quality!r}")
    codes = [_encode_one(p, int(quality)) for p in pixels]
    if header is None:
        if not codes:
            raise ValueError("no images to encode and no header to share")
        header = codes[0][: header_length(codes[0])]
    header = bytes(header)
    n = len(header)
    for code in codes:
        if len(code) <= n or code[:n] != header:
            raise RuntimeError("Pillow wrote JPEG headers that differ between images of one size and quality")
    return header, [code[n:] for code in codes]


def decode_arrays(header: bytes, bodies: Sequence[bytes], channels: int) -> np.ndarray:
    """(shared header, bodies) -> ``[N, C, H, W]`` uint8 pixels, numpy + Pillow only.

    A body that does not decode, or decodes to another channel count than ``channels``, is a :class:`JpegError`.
    """
    from PIL import Image

    if channels not in (1, 3):
        raise JpegError(f"JPEG holds 1 (grey) or 3 (RGB) channels, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    header = bytes(header)
    out = []
    for i, body in enumerate(bodies):
        try:
            with Image.open(io.BytesIO(header + bytes(body)), formats=["JPEG"]) as picture:
                if picture.mode != mode:
                    raise JpegError(f"JPEG image {i} decodes as {picture.mode}, expected {mode} ({channels} channels)")
                array = np.asarray(picture)  # forces the decode; a truncated body raises here
        except JpegError:
            raise
        except (OSError, SyntaxError, ValueError) as exc:  # what Pillow raises for bad or truncated data
            raise JpegError(f"JPEG image {i} does not decode: {exc}") from exc
        out.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
    if not out:
        raise JpegError("no JPEG bodies to decode")
    shapes = {a.shape for a in out}
    if len(shapes) != 1:
        raise JpegError(f"JPEG images of one buffer decode to different shapes {sorted(shapes)}")
    return np.ascontiguousarray(np.stack(out))


def split_body_arrays(data: "bytes | np.ndarray") -> list[bytes]:
    """Concatenated bodies -> one ``bytes`` each, cut after every EOI marker (0xFF 0xD9).

    Entropy-coded data stuffs a zero after every 0xFF byte, so 0xFF 0xD9 occurs only at a body's end.
    """
    data = np.frombuffer(_as_bytes(data), dtype=np.uint8)
    ends = np.flatnonzero((data[:-1] == _EOI[0]) & (data[1:] == _EOI[1])) + 2
    if data.size and (not ends.size or ends[-1] != data.size):
        raise JpegError(f"{data.size - (int(ends[-1]) if ends.size else 0)} bytes after the last JPEG body's end marker")
    starts = np.concatenate([[0], ends[:-1]])
    raw = data.tobytes()
    return [raw[s:e] for s, e in zip(starts.tolist(), ends.tolist())]


# ----------------------------------------------------------------- torch wrappers (host)
def encode(pixels: "torch.Tensor", quality: int, header: "torch.Tensor | None" = None) -> tuple["torch.Tensor", list["torch.Tensor"]]:
    """``[N, C, H, W]`` uint8 pixels -> (shared header, one body per image), as uint8 tensors.

    Raises ``RuntimeError`` if an image's headers differ from ``header`` (or from the first image's).
    """
    import torch

    if pixels.dtype != torch.uint8 or pixels.ndim != 4:
        raise ValueError(f"JPEG encoding needs [N, C, H, W] uint8 pixels, got {pixels.dtype} {tuple(pixels.shape)}")
    head, bodies = encode_arrays(pixels.detach().cpu().numpy(), quality, None if header is None else _as_bytes(header))
    return _tensor(head), [_tensor(b) for b in bodies]


def decode(header: "torch.Tensor", bodies: Sequence["torch.Tensor"], channels: int) -> "torch.Tensor":
    """(shared header, bodies) -> ``[N, C, H, W]`` uint8 pixels (the same pixels :func:`decode_arrays` gives)."""
    import torch

    return torch.from_numpy(decode_arrays(_as_bytes(header), [_as_bytes(b) for b in bodies], channels))


def split_bodies(data: "torch.Tensor") -> list["torch.Tensor"]:
    """Concatenated bodies -> one tensor each, cut after every EOI marker (0xFF 0xD9)."""
    return [_tensor(b) for b in split_body_arrays(data)]


def _tensor(data: bytes) -> "torch.Tensor":
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def roundtrip(images: "torch.Tensor", quality: int, mean: "torch.Tensor", std: "torch.Tensor") -> "torch.Tensor":
    """Normalised ``[N, C, H, W]`` images as JPEG at ``quality`` gives them back (still normalised).

    ``mean`` / ``std`` broadcast against ``images`` (e.g. ``[1, C, 1, 1]``); pixels are clamped to [0, 1]
    and rounded to uint8 first, as a buffer stores them.
    """
    import torch

    pixels = ((images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    header, bodies = encode(pixels, quality)
    return (decode(header, bodies, images.shape[1]).float() / 255.0 - mean) / std
