"""The synthetic replay buffer and its on-disk format.

A :class:`SyntheticBuffer` is what every distiller returns and what the Avalanche
plugin and the edge exporter consume: images in the dataset's normalised space,
hard or soft labels, the class each image stands for, and metadata.

On disk it is one safetensors file (never pickle). The header's metadata holds
a JSON document with the buffer's metadata and a sha256 over the stored tensors,
so a truncated, corrupt or tampered file is refused on load.

A buffer may also hold the learner's *logits* for its images (DER-style knowledge, Buzzega et
al. 2020): int8 per entry with one float16 scale per image, counted in :meth:`SyntheticBuffer.nbytes`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .fileio import atomic_write, sha256_bytes

__all__ = ["SyntheticBuffer", "BufferFormatError", "FORMAT_VERSION", "STORAGE_DTYPES", "decode_upsample", "check_decoder",
           "quantize_logits", "logit_row_bytes"]

FORMAT_VERSION = 1
STORAGE_DTYPES = ("float32", "float16", "uint8", "jpeg")
_BYTES_PER_PIXEL = {"float32": 4, "float16": 2, "uint8": 1, "jpeg": 1}
_HEADER_KEY = "replaykit"


def quantize_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` float logits -> (int8 ``[N, K]``, float16 ``[N]`` scales): symmetric per row, as a buffer holds them."""
    scales = (logits.abs().amax(1) / 127).clamp_min(1e-6).half()
    return (logits / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8), scales


def dequantize_logits(levels: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_logits`: the float32 values a held row stands for."""
    return levels.float() * scales.float()[:, None]


def logit_row_bytes(num_classes: int) -> int:
    """Bytes one image's held logits take: an int8 per class and a float16 scale."""
    return int(num_classes) + 2


class BufferFormatError(ValueError):
    """A buffer (in memory or on disk) is malformed, corrupt or tampered with."""


def check_decoder(decoder: Any) -> int:
    """Validate ``meta["decoder"]`` and return its upsampling factor (1: stored at full resolution).

    The only decoder is ``{"kind": "upsample", "factor": f, "mode": "bilinear"}``: images are
    stored at ``1/f`` of the network's resolution (IDC's multi-formation, Kim et al. 2022), so the
    same bytes hold ``f**2`` times as many images, and decoded by bilinear upsampling
    (``align_corners=False``; the edge device applies the same map in numpy).
    """
    if decoder is None:
        return 1
    if not isinstance(decoder, dict) or decoder.get("kind") != "upsample" or decoder.get("mode", "bilinear") != "bilinear":
        raise BufferFormatError(f"unknown decoder {decoder!r}; expected {{'kind': 'upsample', 'factor': f, 'mode': 'bilinear'}}")
    factor = decoder.get("factor")
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise BufferFormatError(f"decoder factor must be a positive int, got {factor!r}")
    return factor


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


def decode_upsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Differentiable decoder of low-resolution synthetic images: bilinear upsampling by ``factor``."""
    if factor == 1:
        return images
    return torch.nn.functional.interpolate(images, scale_factor=factor, mode="bilinear", align_corners=False)


def _versions() -> dict[str, str]:
    from . import __version__

    return {"replaykit": __version__, "torch": torch.__version__}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class SyntheticBuffer:
    """Replay images with their labels.

    Attributes:
        images: float32 ``[N, C, H, W]`` in the dataset's normalised space.
        labels: int64 ``[N]`` class indices, or float32 ``[N, K]`` soft labels (logits
            or probabilities are the distiller's choice; ``meta['label_kind']`` says).
        num_classes: K, the size of the label space.
        class_ids: int64 ``[N]``: the class each image stands for (the per-class
            index); equal to ``labels`` for hard labels. Defaults to ``argmax`` of soft labels.
        meta: JSON-serialisable metadata: dataset, mean, std, method, ipc, seed, ...
        logits: optional float32 ``[N, K]``: the learner's outputs for the images as held (DER-style
            replay targets), exactly representable by :func:`quantize_logits` (stored int8 + scale).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_ids: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    logits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.images = torch.as_tensor(self.images)
        self.labels = torch.as_tensor(self.labels)
        if self.class_ids is None:
            self.class_ids = self.labels if self.labels.ndim == 1 else self.labels.argmax(dim=1)
        self.class_ids = torch.as_tensor(self.class_ids)
        self.meta = dict(self.meta)
        self.meta.setdefault("created", _now())
        self.meta.setdefault("versions", _versions())
        self.meta.setdefault("label_kind", "soft" if self.labels.ndim == 2 else "hard")
        if self.logits is not None:
            self.logits = torch.as_tensor(self.logits)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`BufferFormatError` naming the first problem found."""
        x, y, ids, k = self.images, self.labels, self.class_ids, self.num_classes
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise BufferFormatError(f"num_classes must be a positive int, got {k!r}")
        if x.ndim != 4:
            raise BufferFormatError(f"images must be [N, C, H, W], got shape {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise BufferFormatError(f"images must be float32, got {x.dtype}")
        n = x.shape[0]
        if y.ndim == 1:
            if y.dtype != torch.int64:
                raise BufferFormatError(f"hard labels must be int64, got {y.dtype}")
        elif y.ndim == 2:
            if y.dtype != torch.float32:
                raise BufferFormatError(f"soft labels must be float32, got {y.dtype}")
            if y.shape[1] != k:
                raise BufferFormatError(f"soft labels have {y.shape[1]} columns but num_classes is {k}")
            if n and not torch.isfinite(y).all():
                raise BufferFormatError("soft labels contain NaN or inf")
            if n and ((y < 0).any() or not torch.allclose(y.sum(1), torch.ones(n), atol=1e-3)):
                raise BufferFormatError("soft labels must be probability rows (non-negative, summing to 1); store softmax of learned logits")
        else:
            raise BufferFormatError(f"labels must be [N] or [N, K], got shape {tuple(y.shape)}")
        if y.shape[0] != n or ids.shape != (n,):
            raise BufferFormatError(
                f"{n} images but {y.shape[0]} labels and {tuple(ids.shape)} class ids; counts must match"
            )
        if ids.dtype != torch.int64:
            raise BufferFormatError(f"class_ids must be int64, got {ids.dtype}")
        if self.logits is not None:
            z = self.logits
            if z.dtype != torch.float32 or z.shape != (n, k):
                raise BufferFormatError(f"logits must be float32 [{n}, {k}], got {z.dtype} {tuple(z.shape)}")
            if n and not torch.isfinite(z).all():
                raise BufferFormatError("logits contain NaN or inf")
        check_decoder(self.meta.get("decoder"))
        check_pixel_bits(self.meta.get("pixel_bits"))
        if n:
            if not torch.isfinite(x).all():
                raise BufferFormatError("images contain NaN or inf")
            checks = [("labels", y)] if y.ndim == 1 else []
            for name, t in checks + [("class ids", ids)]:
                lo, hi = int(t.min()), int(t.max())
                if lo < 0 or hi >= k:
                    raise BufferFormatError(f"{name} must lie in [0, {k - 1}], found range [{lo}, {hi}]")

    # ------------------------------------------------------------- properties
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def is_soft(self) -> bool:
        return self.labels.ndim == 2

    @property
    def classes(self) -> list[int]:
        """Sorted list of the classes held."""
        return sorted(int(c) for c in torch.unique(self.class_ids))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    @property
    def decoder_factor(self) -> int:
        """Upsampling factor from stored to network resolution (1 when stored at full resolution)."""
        return check_decoder(self.meta.get("decoder"))

    @property
    def decoded_shape(self) -> tuple[int, int, int]:
        """Shape of one image as the network sees it (after the decoder)."""
        c, h, w = self.image_shape
        f = self.decoder_factor
        return (c, h * f, w * f)

    def decoded_images(self) -> torch.Tensor:
        """The images at network resolution (decoded when stored at a reduced resolution)."""
        return decode_upsample(self.images, self.decoder_factor)

    def counts(self) -> dict[int, int]:
        """Images held per class."""
        ids, cnt = torch.unique(self.class_ids, return_counts=True)
        return {int(c): int(n) for c, n in zip(ids, cnt)}

    def indices_of(self, cls: int) -> torch.Tensor:
        return torch.nonzero(self.class_ids == cls, as_tuple=False).flatten()

    def nbytes(self, storage: str = "float32") -> int:
        """Bytes the buffer holds with images stored as ``storage``: pixels at their stored resolution,
        one byte per hard label, soft labels at ``meta['soft_label_storage']`` precision (float32 by default)
        plus a one-byte class id."""
        if storage not in _BYTES_PER_PIXEL:
            raise ValueError(f"storage must be one of {STORAGE_DTYPES}, got {storage!r}")
        label_bytes = self.label_nbytes()
        if storage == "jpeg":  # shared headers once + every image's entropy-coded body
            if not len(self):
                return label_bytes
            header, bodies = self._jpeg_codes()
            return header.numel() + sum(b.numel() for b in bodies) + label_bytes
        if storage == "uint8":  # grey levels packed 8 // pixel_bits to a byte, each image padded to whole bytes
            per_image = math.ceil(int(math.prod(self.image_shape)) * self.pixel_bits / 8) if len(self) else 0
            return len(self) * per_image + label_bytes
        return self.images.numel() * _BYTES_PER_PIXEL[storage] + label_bytes

    def label_nbytes(self) -> int:
        """Bytes of the labels: one per hard label; soft rows at ``meta['soft_label_storage']`` plus a one-byte class id;
        held logits at :func:`logit_row_bytes` per image."""
        logit_bytes = 0 if self.logits is None else len(self) * logit_row_bytes(self.num_classes)
        if not self.is_soft:
            return int(self.labels.numel()) + logit_bytes
        soft_bytes = {"float32": 4, "float16": 2}[self.meta.get("soft_label_storage", "float32")]
        return int(self.labels.numel()) * soft_bytes + len(self) + logit_bytes

    @property
    def pixel_bits(self) -> int:
        """Bits per pixel of uint8 storage (8 unless ``meta['pixel_bits']`` says fewer)."""
        return check_pixel_bits(self.meta.get("pixel_bits"))

    @property
    def jpeg_quality(self) -> int:
        """Quality of jpeg storage (``meta['jpeg_quality']``, 50 by default)."""
        quality = self.meta.get("jpeg_quality", 50)
        if not isinstance(quality, int) or not 1 <= quality <= 100:
            raise BufferFormatError(f"jpeg_quality must be an int in [1, 100], got {quality!r}")
        return quality

    def _jpeg_codes(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(shared header, one body per image): the codes these images were decoded from when the
        buffer holds them (see :meth:`_hold_codes`), else a fresh encoding."""
        from . import jpeg

        held = self._held_jpeg_codes()
        if held is not None:
            return held[0], list(held[1])
        return jpeg.encode((self.pixels() * 255.0).round_().to(torch.uint8), self.jpeg_quality)

    def _codes_key(self) -> tuple:
        """What held JPEG codes are valid for: these very image values (no in-place edit since), quality, normalisation."""
        return (self.images.data_ptr(), self.images._version, tuple(self.images.shape), self.meta.get("jpeg_quality", 50),
                json.dumps([self.meta.get("mean"), self.meta.get("std")]))

    def _hold_codes(self, header: torch.Tensor, bodies: Sequence[torch.Tensor]) -> "SyntheticBuffer":
        """Keep the JPEG codes the images decode from, so that saving (or quantising) again writes the same
        bytes: JPEG is not idempotent, and re-encoding decoded images would change them a little each time."""
        if len(bodies) != len(self):
            raise ValueError(f"{len(bodies)} JPEG bodies for {len(self)} images")
        self.__dict__["_held_codes"] = (self._codes_key(), header, list(bodies))
        return self

    def _held_jpeg_codes(self) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        held = self.__dict__.get("_held_codes")
        return (held[1], held[2]) if held is not None and held[0] == self._codes_key() else None

    def quantized(self, storage: str = "uint8") -> "SyntheticBuffer":
        """The buffer as ``storage`` keeps it: uint8 rounds pixels to ``2**pixel_bits`` grey levels,
        jpeg goes through the codec at ``jpeg_quality``, float16 rounds the values."""
        mean, std = _mean_std(self.meta, self.images.shape[1])
        if storage == "float32" or not len(self):
            return self
        if storage == "float16":
            images = self.images.half().float()
        elif storage == "jpeg":
            from . import jpeg

            header, bodies = self._jpeg_codes()
            images = (jpeg.decode(header, bodies, self.images.shape[1]).float() / 255.0 - mean) / std
            return SyntheticBuffer(images.contiguous(), self.labels, self.num_classes, self.class_ids, self.meta,
                                   self.logits)._hold_codes(header, bodies)
        elif storage == "uint8":
            levels = 2 ** self.pixel_bits - 1
            images = ((self.pixels() * levels).round_() / levels - mean) / std
        else:
            raise ValueError(f"storage must be one of {STORAGE_DTYPES}, got {storage!r}")
        return SyntheticBuffer(images.contiguous(), self.labels, self.num_classes, self.class_ids, self.meta, self.logits)

    # ------------------------------------------------------------ operations
    def subset(self, index: torch.Tensor | Sequence[int]) -> "SyntheticBuffer":
        """A new buffer with the images at ``index`` (metadata copied)."""
        idx = torch.as_tensor(index, dtype=torch.int64)
        part = SyntheticBuffer(
            self.images[idx].clone(), self.labels[idx].clone(), self.num_classes, self.class_ids[idx].clone(), dict(self.meta),
            None if self.logits is None else self.logits[idx].clone(),
        )
        held = self._held_jpeg_codes()
        if held is not None:
            part._hold_codes(held[0], [held[1][i] for i in idx.reshape(-1).tolist()])
        return part

    def relabelled(self, labels: torch.Tensor, num_classes: int, meta: dict[str, Any] | None = None) -> "SyntheticBuffer":
        """The same images (and any held JPEG codes) with other labels or label space."""
        logits = self.logits
        if logits is not None and num_classes != self.num_classes:
            raise BufferFormatError(f"a buffer holding logits over {self.num_classes} classes cannot be relabelled to {num_classes}")
        out = SyntheticBuffer(self.images, labels, num_classes, self.class_ids, dict(self.meta) if meta is None else meta, logits)
        held = self._held_jpeg_codes()
        return out if held is None or out._codes_key() != self._codes_key() else out._hold_codes(*held)

    def with_meta(self, **updates: Any) -> "SyntheticBuffer":
        """The same images and labels with ``meta`` updated."""
        return SyntheticBuffer(self.images, self.labels, self.num_classes, self.class_ids, {**self.meta, **updates}, self.logits)

    def with_logits(self, logits: torch.Tensor) -> "SyntheticBuffer":
        """The same buffer holding ``logits`` ``[N, K]`` for its images, rounded to how they are stored (int8 + scale)."""
        logits = torch.as_tensor(logits).detach().float()
        if logits.shape != (len(self), self.num_classes):
            raise ValueError(f"logits must be [{len(self)}, {self.num_classes}], got {tuple(logits.shape)}")
        if not torch.isfinite(logits).all():
            raise ValueError("logits contain NaN or inf")
        out = SyntheticBuffer(self.images, self.labels, self.num_classes, self.class_ids, dict(self.meta),
                              dequantize_logits(*quantize_logits(logits)))
        held = self._held_jpeg_codes()
        return out if held is None else out._hold_codes(*held)

    def select_classes(self, classes: Iterable[int]) -> "SyntheticBuffer":
        wanted = torch.as_tensor(sorted(set(int(c) for c in classes)), dtype=torch.int64)
        return self.subset(torch.nonzero(torch.isin(self.class_ids, wanted)).flatten())

    def soft_targets(self) -> torch.Tensor:
        """Labels as ``[N, K]`` float targets (one-hot for hard labels)."""
        if self.is_soft:
            return self.labels
        return torch.nn.functional.one_hot(self.labels, self.num_classes).float()

    @classmethod
    def concat(cls, buffers: Sequence["SyntheticBuffer"], meta: dict[str, Any] | None = None) -> "SyntheticBuffer":
        """Join buffers of the same image shape and label space.

        Hard and soft labels mix by turning hard labels into one-hot rows.
        """
        if not buffers:
            raise ValueError("concat needs at least one buffer")
        k = buffers[0].num_classes
        shapes = {b.image_shape for b in buffers if len(b)}
        if len(shapes) > 1 or any(b.num_classes != k for b in buffers):
            raise BufferFormatError(
                f"cannot join buffers with image shapes {sorted(shapes)} and num_classes {[b.num_classes for b in buffers]}"
            )
        decoders = {json.dumps(b.meta.get("decoder"), sort_keys=True) for b in buffers if len(b)}
        if len(decoders) > 1:
            raise BufferFormatError(f"cannot join buffers held at different resolutions (decoders {sorted(decoders)})")
        soft = any(b.is_soft for b in buffers)
        labels = [b.soft_targets() if soft else b.labels for b in buffers]
        merged_meta = dict(buffers[0].meta) if meta is None else dict(meta)
        with_logits = [b.logits is not None for b in buffers if len(b)]
        if any(with_logits) and not all(with_logits):
            raise BufferFormatError("cannot join buffers with and without held logits")
        joined = cls(
            torch.cat([b.images for b in buffers]),
            torch.cat(labels),
            k,
            torch.cat([b.class_ids for b in buffers]),
            merged_meta,
            torch.cat([b.logits for b in buffers if len(b)]) if any(with_logits) else None,
        )
        return _join_held_codes(joined, buffers)

    @classmethod
    def empty(cls, image_shape: Sequence[int], num_classes: int, meta: dict[str, Any] | None = None) -> "SyntheticBuffer":
        return cls(
            torch.zeros(0, *image_shape), torch.zeros(0, dtype=torch.int64), num_classes, torch.zeros(0, dtype=torch.int64), meta or {}
        )

    def pixels(self) -> torch.Tensor:
        """Images mapped back to [0, 1] pixels with the stored mean / std, clipped."""
        mean, std = _mean_std(self.meta, self.images.shape[1])
        return (self.images * std + mean).clamp_(0.0, 1.0)

    # -------------------------------------------------------------- file I/O
    def _stored_images(self, storage: str) -> torch.Tensor:
        if storage == "float32":
            return self.images.contiguous()
        if storage == "float16":
            return self.images.to(torch.float16).contiguous()
        if storage == "uint8":
            levels = (self.pixels() * (2 ** self.pixel_bits - 1)).round_().to(torch.uint8)
            return levels.contiguous() if self.pixel_bits == 8 else pack_levels(levels, self.pixel_bits).contiguous()
        if storage == "jpeg":  # the shared header, then every body; bodies end with EOI, so no lengths are needed
            header, bodies = self._jpeg_codes() if len(self) else (torch.zeros(0, dtype=torch.uint8), [])
            return torch.cat([header] + bodies).contiguous() if bodies else header
        raise ValueError(f"storage must be one of {STORAGE_DTYPES}, got {storage!r}")

    def save(self, path: str | os.PathLike, storage: str = "float32") -> Path:
        """Write the buffer atomically as safetensors; images stored as ``storage``.

        ``float16`` and ``uint8`` trade precision for 2x / 4x smaller files; ``uint8``
        quantises pixels after undoing the normalisation.
        """
        from safetensors.torch import save_file

        tensors = {
            "images": self._stored_images(storage),
            "labels": self.labels.clone(),
            "class_ids": self.class_ids.clone(),
        }
        if self.logits is not None:
            tensors["logits"], tensors["logit_scales"] = quantize_logits(self.logits)
        header = {
            "jpeg_header_bytes": _jpeg_header_bytes(tensors["images"]) if storage == "jpeg" and len(self) else 0,
            "format_version": FORMAT_VERSION,
            "num_classes": self.num_classes,
            "storage": storage,
            "image_shape": list(self.image_shape),
            "meta": self.meta,
            "sha256": _tensor_digest(tensors),
        }
        header["header_sha256"] = _header_digest(header)
        metadata = {_HEADER_KEY: json.dumps(header, sort_keys=True)}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SyntheticBuffer":
        """Read a buffer written by :meth:`save`, verifying structure and checksum."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no buffer file at {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                # Copies: safetensors hands out views of its memory map, and a file later rewritten in place (not
                # renamed over) would silently change the loaded buffer, or crash the process if it shrank.
                tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}
        except Exception as exc:  # safetensors raises its own error types for bad headers / truncation
            raise BufferFormatError(f"{path} is not a readable safetensors buffer (truncated or corrupt?): {exc}") from exc
        if _HEADER_KEY not in metadata:
            raise BufferFormatError(f"{path} has no ReplayKit header; it was not written by SyntheticBuffer.save")
        try:
            header = json.loads(metadata[_HEADER_KEY])
        except (ValueError, RecursionError) as exc:
            raise BufferFormatError(f"{path}: the ReplayKit header is not valid JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise BufferFormatError(f"{path}: the ReplayKit header is a JSON {type(header).__name__}, not an object")
        # The tensors' checksum does not cover the header (meta, classes, storage): its own does. Files written
        # before it existed have none and are read as they are.
        if "header_sha256" in header and header["header_sha256"] != _header_digest(header):
            raise BufferFormatError(f"{path}: the ReplayKit header does not match its checksum; it was modified or corrupted")
        if not isinstance(header.get("meta", {}), dict) or isinstance(header.get("num_classes"), bool) \
                or not isinstance(header.get("num_classes"), int):
            raise BufferFormatError(f"{path}: the ReplayKit header needs an int num_classes and an object meta")
        try:
            return cls._from_checked(path, header, tensors)
        except BufferFormatError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError) as exc:
            # A header written by someone else (it matched its checksum) that this reader cannot make sense of.
            raise BufferFormatError(f"{path}: the buffer does not decode: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def _from_checked(cls, path: Path, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "SyntheticBuffer":
        if header.get("format_version") != FORMAT_VERSION:
            raise BufferFormatError(f"{path}: format version {header.get('format_version')!r}, this ReplayKit reads {FORMAT_VERSION}")
        missing = {"images", "labels", "class_ids"} - tensors.keys()
        if missing:
            raise BufferFormatError(f"{path} lacks tensors {sorted(missing)}")
        if _tensor_digest(tensors) != header.get("sha256"):
            raise BufferFormatError(f"{path}: checksum mismatch; the file was modified or corrupted after it was written")
        storage = header.get("storage")
        expected = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8, "jpeg": torch.uint8}.get(storage)
        if expected is None or tensors["images"].dtype != expected:
            raise BufferFormatError(f"{path}: images stored as {tensors['images'].dtype}, header says {storage!r}")
        meta = header.get("meta", {})
        images = tensors["images"]
        bits = check_pixel_bits(meta.get("pixel_bits"))
        codes = None
        if storage == "jpeg":
            images, codes = _load_jpeg(path, images, header, meta, tensors["labels"].shape[0])
            storage, bits = "uint8", 8
        elif storage == "uint8" and bits < 8:
            shape = header.get("image_shape")
            if not (isinstance(shape, list) and len(shape) == 3 and images.ndim == 2):
                raise BufferFormatError(f"{path}: packed {bits}-bit images need a [N, bytes] tensor and an image_shape in the header")
            count = int(math.prod(shape))
            if images.shape[1] != math.ceil(count * bits / 8):
                raise BufferFormatError(f"{path}: packed rows of {images.shape[1]} bytes do not hold {shape} pixels at {bits} bits")
            images = unpack_levels(images, bits, count).reshape(-1, *shape)
        if images.ndim != 4:
            raise BufferFormatError(f"{path}: images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if storage == "uint8":
            mean, std = _mean_std(meta, images.shape[1])
            images = (images.float() / (2 ** bits - 1) - mean) / std
        logits = None
        if "logits" in tensors or "logit_scales" in tensors:
            levels, scales = tensors.get("logits"), tensors.get("logit_scales")
            if levels is None or scales is None or levels.dtype != torch.int8 or scales.dtype != torch.float16 \
                    or levels.ndim != 2 or scales.shape != levels.shape[:1]:
                raise BufferFormatError(f"{path}: held logits must be int8 [N, K] with float16 [N] scales")
            logits = dequantize_logits(levels, scales)
        loaded = cls(images.float(), tensors["labels"], int(header["num_classes"]), tensors["class_ids"], meta, logits)
        return loaded if codes is None else loaded._hold_codes(*codes)

    def __repr__(self) -> str:
        kind = "soft" if self.is_soft else "hard"
        return (
            f"SyntheticBuffer({len(self)} images {self.image_shape}, {kind} labels, "
            f"classes={self.counts()}, method={self.meta.get('method')!r})"
        )


def _join_held_codes(joined: SyntheticBuffer, parts: Sequence[SyntheticBuffer]) -> SyntheticBuffer:
    """Carry held JPEG codes into a concatenation: parts that hold codes keep them (no second
    generation of JPEG loss for images already stored), the others are encoded with the same header."""
    held = [p._held_jpeg_codes() for p in parts]
    if not any(h is not None for h in held) or "jpeg_quality" not in joined.meta:
        return joined
    from . import jpeg

    header = next(h[0] for h in held if h is not None)
    bodies: list[torch.Tensor] = []
    for part, codes in zip(parts, held):
        if not len(part):
            continue
        if codes is not None and torch.equal(codes[0], header) and part.meta.get("jpeg_quality") == joined.jpeg_quality:
            bodies += codes[1]
        else:
            pixels = (part.with_meta(**{k: joined.meta.get(k) for k in ("mean", "std") if k in joined.meta}).pixels() * 255.0)
            bodies += jpeg.encode(pixels.round_().to(torch.uint8), joined.jpeg_quality, header)[1]
    return joined._hold_codes(header, bodies)


def _jpeg_header_bytes(stored: torch.Tensor) -> int:
    """Length of the shared header at the front of jpeg-stored images (read from the bytes, not encoded again)."""
    from . import jpeg

    return jpeg.header_length(stored)


def _load_jpeg(path: Path, data: torch.Tensor, header: dict[str, Any], meta: dict[str, Any],
               count: int) -> tuple[torch.Tensor, tuple[torch.Tensor, list[torch.Tensor]] | None]:
    """Decode a jpeg-stored images tensor (shared header + bodies) into ``[N, C, H, W]`` uint8 pixels, with the codes."""
    from . import jpeg

    shape, head = header.get("image_shape"), header.get("jpeg_header_bytes")
    if not (isinstance(shape, list) and len(shape) == 3 and isinstance(head, int) and data.ndim == 1):
        raise BufferFormatError(f"{path}: jpeg storage needs a flat byte tensor, image_shape and jpeg_header_bytes in the header")
    if count == 0:
        return torch.zeros(0, *shape, dtype=torch.uint8), None
    try:
        bodies = jpeg.split_bodies(data[head:])
    except jpeg.JpegError as exc:
        raise BufferFormatError(f"{path}: {exc}") from exc
    if len(bodies) != count:
        raise BufferFormatError(f"{path}: {len(bodies)} JPEG images for {count} labels")
    try:
        pixels = jpeg.decode(data[:head], bodies, int(shape[0]))
    except (RuntimeError, jpeg.JpegError) as exc:
        raise BufferFormatError(f"{path}: a stored JPEG image does not decode: {exc}") from exc
    if tuple(pixels.shape[1:]) != tuple(shape):
        raise BufferFormatError(f"{path}: JPEG images decode to {tuple(pixels.shape[1:])}, the header says {tuple(shape)}")
    return pixels, (data[:head].clone(), [b.clone() for b in bodies])


def _mean_std(meta: dict[str, Any], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation of ``meta`` as broadcastable tensors (identity when absent)."""
    mean = torch.tensor(meta.get("mean", [0.0] * channels), dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(meta.get("std", [1.0] * channels), dtype=torch.float32).view(1, -1, 1, 1)
    if mean.shape[1] != channels or std.shape[1] != channels:
        raise BufferFormatError(f"meta mean/std have {mean.shape[1]}/{std.shape[1]} channels, images have {channels}")
    return mean, std


def _header_digest(header: dict[str, Any]) -> str:
    """sha256 of the header's canonical JSON without the checksums (the tensors' one is checked against them)."""
    body = {k: v for k, v in header.items() if k not in ("header_sha256", "sha256")}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    parts: list[bytes] = []
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        parts.append(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        parts.append(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return sha256_bytes(*parts)
