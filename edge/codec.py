"""How a bundle stores parameters and replay images, and how the device decodes them (numpy only).

Parameters: ``float32`` as trained; ``float16``; or ``int8``: every weight with two or more
dimensions (convolutions, linear layers) is quantised symmetrically per output channel, its
float32 scales stored beside it as ``scale.<name>``; biases and norm parameters (a few hundred
floats) stay float32. The device dequantizes everything to float32 when it opens a bundle, so
training is float32 whatever the storage.

Replay images: stored at ``1/factor`` of the network's resolution when the buffer carries the
decoder ``{"kind": "upsample", "factor": f, "mode": "bilinear"}``; the device upsamples them with
the same bilinear map as ``torch.nn.functional.interpolate(scale_factor=f, mode="bilinear",
align_corners=False)``, in numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from replaykit.typed import check_positive_int  # standard library only: safe on the device

WEIGHT_STORAGES = ("float32", "float16", "int8")
SCALE_PREFIX = "scale."
_INT8_MAX = 127


class CodecError(ValueError):
    """Stored parameters or a decoder entry that cannot be decoded."""


# ----------------------------------------------------------------- parameters
def quantize_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: ``weight ~= q * scale[:, None, ...]`` with ``|error| <= scale / 2``.

    A channel of zeros gets scale 0 (and q 0), so it dequantizes to exact zeros."""
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim < 2:
        raise ValueError(f"int8 quantisation is per output channel: needs a weight with >= 2 dims, got {weight.shape}")
    peak = np.abs(weight).reshape(weight.shape[0], -1).max(axis=1)
    scale = (peak / np.float32(_INT8_MAX)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0)).reshape(-1, *([1] * (weight.ndim - 1)))
    q = np.clip(np.rint(weight / safe), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) * scale.reshape(-1, *([1] * (q.ndim - 1)))).astype(np.float32)


def parameter_storage(shape: tuple[int, ...], weights: str) -> str:
    """The dtype one parameter is stored in under the bundle-wide ``weights`` option."""
    if weights not in WEIGHT_STORAGES:
        raise ValueError(f"weights must be one of {WEIGHT_STORAGES}, got {weights!r}")
    if weights == "int8" and len(shape) < 2:
        return "float32"
    return weights


def encode_parameters(params: dict[str, np.ndarray], weights: str, prefix: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors to write (``prefix + name``, plus ``scale.`` tensors for int8) and each parameter's storage."""
    tensors: dict[str, np.ndarray] = {}
    storage: dict[str, str] = {}
    for name, value in params.items():
        kind = storage[name] = parameter_storage(tuple(value.shape), weights)
        if kind == "int8":
            tensors[prefix + name], tensors[SCALE_PREFIX + prefix + name] = quantize_int8(value)
        else:
            tensors[prefix + name] = np.asarray(value, dtype=kind)
    return tensors, storage


def decode_parameters(tensors: dict[str, np.ndarray], shapes: dict[str, list[int]], storage: dict[str, str],
                      prefix: str, where: str) -> dict[str, np.ndarray]:
    """Float32 parameters from the stored tensors; every mismatch with the manifest raises :class:`CodecError`."""
    params: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        kind = storage.get(name)
        if kind not in WEIGHT_STORAGES:
            raise CodecError(f"{where}: parameter {name!r} has storage {kind!r} in the manifest; expected one of {WEIGHT_STORAGES}")
        array = tensors.get(prefix + name)
        if array is None:
            raise CodecError(f"{where}: parameter {name!r} listed in the manifest is not in the buffer file")
        if list(array.shape) != list(shape) or array.dtype != np.dtype(kind):
            raise CodecError(f"{where}: parameter {name!r} is stored as {array.dtype}{list(array.shape)}, "
                             f"the manifest says {kind}{list(shape)}")
        if kind != "int8":
            params[name] = array.astype(np.float32)
            continue
        scale = tensors.get(SCALE_PREFIX + prefix + name)
        if scale is None or scale.dtype != np.float32 or scale.shape != (shape[0],):
            raise CodecError(f"{where}: int8 parameter {name!r} lacks its float32 scales [{shape[0]}] "
                             f"({SCALE_PREFIX}{prefix}{name})")
        if not (np.isfinite(scale).all() and (scale >= 0).all()) or (array == -128).any():
            raise CodecError(f"{where}: int8 parameter {name!r} has negative / non-finite scales or the value -128; "
                             "not written by this exporter")
        params[name] = dequantize_int8(array, scale)
    return params


# ----------------------------------------------------------------- images
def decoder_factor(decoder: Any) -> int:
    """Validate a manifest's ``decoder`` entry (``None``: full resolution) and return its factor."""
    if decoder is None:
        return 1
    if not isinstance(decoder, dict) or decoder.get("kind") != "upsample" or decoder.get("mode") != "bilinear":
        raise CodecError(f"unknown image decoder {decoder!r}; this runtime decodes "
                         "{'kind': 'upsample', 'factor': f, 'mode': 'bilinear'}")
    factor = decoder.get("factor")
    check_positive_int("decoder factor", factor, CodecError)
    return factor


def _source_index(size_in: int, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's ``area_pixel_compute_source_index`` (align_corners=False) and the two weights of each output."""
    scale = np.float64(np.float32(1.0 / factor))
    # scale * (dst + 0.5) - 0.5 with one rounding, as the compiled kernel's fused multiply-add gives.
    dst = np.arange(size_in * factor, dtype=np.float64)
    src = np.maximum(scale * (dst + 0.5) - 0.5, 0.0).astype(np.float32)
    low = src.astype(np.int64)  # src >= 0, so truncation is floor
    high = np.minimum(low + 1, size_in - 1)
    return low, high, (src - low.astype(np.float32)).astype(np.float32)


def _blend(a: np.ndarray, b: np.ndarray, weight_a: np.ndarray, weight_b: np.ndarray) -> np.ndarray:
    """``a * weight_a + b * weight_b`` rounded as ``fma(a, weight_a, b * weight_b)``: the closest match to torch's kernel."""
    return (a.astype(np.float64) * weight_a + (b * weight_b).astype(np.float32)).astype(np.float32)


def upsample_bilinear(images: np.ndarray, factor: int) -> np.ndarray:
    """``[N, C, h, w]`` float32 -> ``[N, C, h*f, w*f]``: bilinear, align_corners=False.

    Torch's map (columns inside, rows outside, as ``upsample_bilinear2d`` on CPU computes it); measured
    against ``torch.nn.functional.interpolate`` the results differ by at most one float32 ulp."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {images.shape}")
    if factor == 1:
        return images
    one = np.float32(1.0)
    low, high, frac = _source_index(images.shape[3], factor)
    columns = _blend(images[..., low], images[..., high], one - frac, frac)
    low, high, frac = _source_index(images.shape[2], factor)
    return np.ascontiguousarray(_blend(columns[:, :, low, :], columns[:, :, high, :], (one - frac)[:, None], frac[:, None]))


# ----------------------------------------------------------------- replay buffer (as the host holds it)
#: How a bundle's replay images are stored: the host buffer's own codes (``SyntheticBuffer._stored_images``).
IMAGE_STORAGES = ("uint8", "float16", "float32", "jpeg")
LABEL_STORAGES = ("hard", "float16", "float32")


def unpack_levels(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``[N, B]`` bytes holding ``8 // bits`` grey levels each (lowest bits first) -> ``[N, count]`` uint8 levels;
    the inverse of the host's ``replaykit.buffer.pack_levels``."""
    if bits not in (1, 2, 4, 8):
        raise CodecError(f"pixel_bits must be one of 1, 2, 4, 8, got {bits!r}")
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[:, :count]
    shifts = (np.arange(8 // bits, dtype=np.uint8) * bits).astype(np.uint8)
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1)[:, :count]


#: Bytes per held value of each image storage on the device (JPEG is held as its decoded uint8 pixels).
HELD_BYTES = {"uint8": 1, "jpeg": 1, "float16": 2, "float32": 4}
_JPEG_CHUNK = 256  # images decoded per Pillow pass at open: bounds the list of per-image arrays decode_arrays stacks


class ReplayImages:
    """A bundle's replay images as the device holds them: uint8 levels (grey levels, unpacked; JPEG decoded once
    to its uint8 pixels) or the stored float16 / float32, at the stored resolution. :meth:`take` gives rows as
    normalised float32 at the network's resolution, per mini-batch, so the float32 buffer is never resident (a
    1,452-image JPEG buffer: 1.1 MB held instead of 4.6 MB). Row by row the arithmetic is that of decoding all at
    once, so the values are identical."""

    def __init__(self, held: np.ndarray, maximum: int | None, mean: np.ndarray, std: np.ndarray, factor: int = 1) -> None:
        self.held, self.maximum, self.factor = held, maximum, factor
        self.mean, self.std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)

    def __len__(self) -> int:
        return int(self.held.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.held.nbytes)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the decoded buffer ``[N, C, H*f, W*f]``."""
        n, c, h, w = self.held.shape
        return (n, c, h * self.factor, w * self.factor)

    def take(self, index: np.ndarray | slice) -> np.ndarray:
        """Rows ``index`` as normalised float32 ``[k, C, H*f, W*f]`` (a fresh array)."""
        rows = self.held[index]
        if self.maximum is None:
            small = rows.astype(np.float32)
        else:
            small = (rows.astype(np.float32) / np.float32(self.maximum) - self.mean) / self.std
        return np.ascontiguousarray(upsample_bilinear(small.astype(np.float32, copy=False), self.factor), dtype=np.float32)

    def all(self) -> np.ndarray:
        """Every row decoded (allocates the whole float32 buffer: for inspection and tests, not for training)."""
        return self.take(slice(None))


def read_replay_images(stored: np.ndarray, storage: str, shape: tuple[int, int, int], count: int, *,
                       mean: np.ndarray, std: np.ndarray, pixel_bits: int = 8, jpeg_header_bytes: int = 0,
                       factor: int = 1) -> ReplayImages:
    """A bundle's stored replay images -> :class:`ReplayImages` (``count`` images of ``shape``), every code checked.

    The same arithmetic as the host (``SyntheticBuffer.load`` / ``quantized``): levels / (2**bits - 1) or JPEG
    pixels / 255, then ``(p - mean) / std`` in float32; float16 / float32 images are stored normalised."""
    from replaykit import jpeg  # numpy + Pillow only

    if storage not in IMAGE_STORAGES:
        raise CodecError(f"image storage {storage!r} is not one of {IMAGE_STORAGES}")
    stored = np.asarray(stored)
    if storage == "jpeg":
        if stored.dtype != np.uint8 or stored.ndim != 1 or not 0 < jpeg_header_bytes < stored.size:
            raise CodecError(f"JPEG images must be one flat uint8 array after a {jpeg_header_bytes}-byte header, "
                             f"got {stored.dtype}{list(stored.shape)}")
        try:
            bodies = jpeg.split_body_arrays(stored[jpeg_header_bytes:])
            if len(bodies) != count:
                raise CodecError(f"{len(bodies)} JPEG images for {count} labels")
            header = stored[:jpeg_header_bytes].tobytes()
            held = np.empty((count, *shape), dtype=np.uint8)
            for start in range(0, count, _JPEG_CHUNK):
                part = jpeg.decode_arrays(header, bodies[start: start + _JPEG_CHUNK], shape[0])
                if part.shape[1:] != tuple(shape):
                    raise CodecError(f"JPEG images decode to {list(part.shape[1:])}, the manifest says {list(shape)}")
                held[start: start + len(part)] = part
            del bodies
        except jpeg.JpegError as exc:
            raise CodecError(str(exc)) from exc
        maximum: int | None = 255
    elif storage == "uint8":
        maximum = (1 << pixel_bits) - 1
        if stored.dtype != np.uint8:
            raise CodecError(f"images stored as {stored.dtype}, the manifest says uint8")
        if pixel_bits == 8:
            held = stored
        else:
            if stored.ndim != 2 or stored.shape[1] != -(-int(np.prod(shape)) * pixel_bits // 8):
                raise CodecError(f"packed {pixel_bits}-bit images must be [N, bytes] uint8 rows holding {list(shape)}, "
                                 f"got {stored.dtype}{list(stored.shape)}")
            held = unpack_levels(stored, pixel_bits, int(np.prod(shape))).reshape(-1, *shape)
        if held.max(initial=0) > maximum:
            raise CodecError(f"uint8 images hold values above {maximum} ({pixel_bits}-bit levels)")
    else:
        if stored.dtype != np.dtype(storage):
            raise CodecError(f"images stored as {stored.dtype}, the manifest says {storage}")
        if not np.isfinite(stored).all():
            raise CodecError("replay images contain NaN or inf")
        held, maximum = stored, None
    if held.shape != (count, *shape):
        raise CodecError(f"replay images decode to {list(held.shape)}, the manifest says {[count, *shape]}")
    images = ReplayImages(np.ascontiguousarray(held), maximum, mean, std, factor)
    if maximum is not None:  # (p - mean) / std is monotone in p: finite at the two extreme levels, finite for all
        ends = (np.array([0.0, 1.0], dtype=np.float32).reshape(2, 1, 1, 1) - images.mean) / images.std
        if not np.isfinite(ends).all():
            raise CodecError("replay images contain NaN or inf (a zero or non-finite std / mean)")
    return images


def decode_stored_images(stored: np.ndarray, storage: str, shape: tuple[int, int, int], count: int, *,
                         mean: np.ndarray, std: np.ndarray, pixel_bits: int = 8, jpeg_header_bytes: int = 0) -> np.ndarray:
    """A bundle's stored replay images -> ``[count, *shape]`` normalised float32 at their stored resolution
    (all at once: see :class:`ReplayImages` for the per-batch form the Retrainer holds)."""
    return read_replay_images(stored, storage, shape, count, mean=mean, std=std, pixel_bits=pixel_bits,
                              jpeg_header_bytes=jpeg_header_bytes).all()


def dequantize_logits(levels: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Held logits: int8 ``[N, K]`` times float16 ``[N]`` row scales, as ``replaykit.buffer.dequantize_logits``."""
    if levels.dtype != np.int8 or scales.dtype != np.float16 or levels.ndim != 2 or scales.shape != levels.shape[:1]:
        raise CodecError(f"held logits must be int8 [N, K] with float16 [N] scales, got {levels.dtype}{list(levels.shape)} "
                         f"and {scales.dtype}{list(scales.shape)}")
    return levels.astype(np.float32) * scales.astype(np.float32)[:, None]


def avg_pool(images: np.ndarray, factor: int) -> np.ndarray:
    """``[N, C, H, W]`` -> mean over non-overlapping ``factor x factor`` windows (H, W multiples of it)."""
    if factor == 1:
        return images
    n, c, h, w = images.shape
    return images.reshape(n, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5), dtype=np.float32)


def has_view(storage: str, factor: int) -> bool:
    """Whether storing changes images in a way a learner could pick up (the host's ``DistilledBuffer.view``):
    a reduced resolution, or JPEG."""
    return factor > 1 or storage == "jpeg"


def view_images(images: np.ndarray, storage: str, factor: int, mean: np.ndarray, std: np.ndarray,
                quality: int | None = None) -> np.ndarray:
    """Normalised full-resolution images as the buffer's codec would give them back: average-pooled by
    ``factor``, through JPEG at ``quality`` (pixels clamped and rounded as the host does), upsampled."""
    from replaykit import jpeg

    small = avg_pool(np.asarray(images, dtype=np.float32), factor)
    if storage == "jpeg":
        pixels = np.rint(np.clip(small * std + mean, 0.0, 1.0) * np.float32(255)).astype(np.uint8)
        header, bodies = jpeg.encode_arrays(pixels, int(quality))
        small = (jpeg.decode_arrays(header, bodies, pixels.shape[1]).astype(np.float32) / np.float32(255) - mean) / std
    return upsample_bilinear(small.astype(np.float32), factor)
