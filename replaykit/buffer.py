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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from . import codecs
from .codecs import BufferFormatError, Codec, Codes, check_decoder, check_pixel_bits, label_row_bytes, logit_row_bytes
from .codecs import PIXEL_BITS, pack_levels, unpack_levels  # noqa: F401  (their home was here)
from .codecs import upsample as decode_upsample
from .codecs.jpeg import check_quality
from .fileio import atomic_write, sha256_bytes
from .typed import check_positive_int

__all__ = ["SyntheticBuffer", "BufferFormatError", "FORMAT_VERSION", "STORAGE_DTYPES", "decode_upsample", "check_decoder",
           "quantize_logits", "logit_row_bytes"]

FORMAT_VERSION = 1
STORAGE_DTYPES = codecs.storages()
_HEADER_KEY = "replaykit"


def quantize_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` float logits -> (int8 ``[N, K]``, float16 ``[N]`` scales): symmetric per row, as a buffer holds them."""
    scales = (logits.abs().amax(1) / 127).clamp_min(1e-6).half()
    return (logits / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8), scales


def dequantize_logits(levels: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_logits`: the float32 values a held row stands for."""
    return levels.float() * scales.float()[:, None]


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
        check_positive_int("num_classes", k, BufferFormatError)
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

    def codec(self, storage: str = "float32") -> Codec:
        """The codec of these images held as ``storage``, at their held resolution (grey levels of
        ``meta['pixel_bits']``, JPEG at ``meta['jpeg_quality']``, the normalisation of ``meta``)."""
        known = STORAGE_DTYPES
        if storage not in known:
            raise ValueError(f"storage must be one of {known}, got {storage!r}")
        mean, std = _mean_std(self.meta, self.images.shape[1])
        return codecs.for_storage(storage, bits=self.pixel_bits, quality=self.meta.get("jpeg_quality", 50), mean=mean, std=std)

    def codes(self, storage: str = "float32") -> Codes:
        """What ``storage`` keeps of the images: the codes they were decoded from when the buffer holds them
        (see :meth:`_hold_codes`), else a fresh encoding."""
        codec = self.codec(storage)
        held = self._held_jpeg_codes() if codec.holds_codes else None
        return Codes(list(held[1]), held[0]) if held is not None else codec.encode(self.images)

    def nbytes(self, storage: str = "float32") -> int:
        """Bytes the buffer holds with images stored as ``storage``: pixels at their stored resolution as the codec
        counts them (JPEG: the shared headers once + every body), plus :meth:`label_nbytes`."""
        codec = self.codec(storage)
        label_bytes = self.label_nbytes()
        if not len(self):
            return label_bytes
        per_image = codec.image_nbytes(self.image_shape)
        pixels = len(self) * per_image if per_image is not None else codec.nbytes(self.codes(storage))
        return pixels + label_bytes

    def label_nbytes(self) -> int:
        """Bytes of the labels: one per hard label; soft rows at ``meta['soft_label_storage']`` plus a one-byte class id;
        held logits at :func:`logit_row_bytes` per image (:func:`replaykit.codecs.label_row_bytes` per image)."""
        soft = self.num_classes if self.is_soft else 0
        soft_bytes = {"float32": 4, "float16": 2}[self.meta.get("soft_label_storage", "float32")] if soft else 2
        return len(self) * label_row_bytes(soft, self.num_classes if self.logits is not None else 0, soft_bytes)

    @property
    def pixel_bits(self) -> int:
        """Bits per pixel of uint8 storage (8 unless ``meta['pixel_bits']`` says fewer)."""
        return check_pixel_bits(self.meta.get("pixel_bits"))

    @property
    def jpeg_quality(self) -> int:
        """Quality of jpeg storage (``meta['jpeg_quality']``, 50 by default)."""
        return check_quality(self.meta.get("jpeg_quality", 50))

    def _jpeg_codes(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(shared header, one body per image) of jpeg storage (see :meth:`codes`)."""
        codes = self.codes("jpeg")
        return codes.header, list(codes.bodies)

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
        jpeg goes through the codec at ``jpeg_quality`` (and holds its codes), float16 rounds the values."""
        codec = self.codec(storage)
        if codec.lossless or not len(self):
            return self
        if codec.holds_codes:
            codes = self.codes(storage)
            images = codec.decode(codes, self.image_shape)
            return SyntheticBuffer(images.contiguous(), self.labels, self.num_classes, self.class_ids, self.meta,
                                   self.logits)._hold_codes(codes.header, list(codes.bodies))
        images = codec.roundtrip(self.images)
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
        """The one tensor a file holds for the images (JPEG: the shared header, then every body)."""
        codec = self.codec(storage)
        return codec.pack(self.codes(storage))

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
            "jpeg_header_bytes": self.codec(storage).header_nbytes(tensors["images"]) if len(self) else 0,
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
        storage, images = header.get("storage"), tensors["images"]
        if storage not in STORAGE_DTYPES or images.dtype != codecs.REGISTRY[storage].dtype:
            raise BufferFormatError(f"{path}: images stored as {images.dtype}, header says {storage!r}")
        meta = header.get("meta", {})
        bits = check_pixel_bits(meta.get("pixel_bits"))
        shape = header.get("image_shape")
        shape = tuple(shape) if isinstance(shape, list) and len(shape) == 3 else tuple(images.shape[1:]) if images.ndim == 4 else ()
        count = int(tensors["labels"].shape[0])
        try:
            codec = codecs.for_storage(storage, bits=bits, quality=meta.get("jpeg_quality", 50))
            codes = codec.unpack(images, count, shape, header.get("jpeg_header_bytes"))
            if codec.stores_pixels:  # the normalisation to undo comes from meta
                mean, std = _mean_std(meta, shape[0])
                codec = codecs.for_storage(storage, bits=bits, quality=meta.get("jpeg_quality", 50), mean=mean, std=std)
            images = codec.decode(codes, shape)
        except BufferFormatError as exc:
            raise BufferFormatError(f"{path}: {exc}") from exc
        if images.ndim != 4:
            raise BufferFormatError(f"{path}: images must be [N, C, H, W], got shape {tuple(images.shape)}")
        logits = None
        if "logits" in tensors or "logit_scales" in tensors:
            levels, scales = tensors.get("logits"), tensors.get("logit_scales")
            if levels is None or scales is None or levels.dtype != torch.int8 or scales.dtype != torch.float16 \
                    or levels.ndim != 2 or scales.shape != levels.shape[:1]:
                raise BufferFormatError(f"{path}: held logits must be int8 [N, K] with float16 [N] scales")
            logits = dequantize_logits(levels, scales)
        loaded = cls(images.float(), tensors["labels"], int(header["num_classes"]), tensors["class_ids"], meta, logits)
        return loaded._hold_codes(codes.header, list(codes.bodies)) if codec.holds_codes and count else loaded

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
    codec = joined.codec("jpeg")
    header = next(h[0] for h in held if h is not None)
    bodies: list[torch.Tensor] = []
    for part, codes in zip(parts, held):
        if not len(part):
            continue
        if codes is not None and torch.equal(codes[0], header) and part.meta.get("jpeg_quality") == joined.jpeg_quality:
            bodies += codes[1]
        else:
            bodies += list(codec.encode(part.images, header).bodies)
    return joined._hold_codes(header, bodies)


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
