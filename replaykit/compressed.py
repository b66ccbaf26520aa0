"""Compressed raw replay: the strongest honest rival of distilled replay at equal bytes.

Instead of synthesising images, keep *real* exemplars and compress them, so a byte
budget holds more of them (MRDC, Wang et al., ICLR 2022):

* ``codec="downsample"``: average-pooled by ``factor`` and stored as uint8, decoded with
  the same bilinear upsampling as ReplayKit's low-resolution synthetic images;
* ``codec="jpeg"``: encoded with Pillow's JPEG encoder (:mod:`replaykit.jpeg`) at ``quality``. Every byte is
  counted; the headers and tables (~330 of the ~490 bytes of a 28x28 MNIST JPEG at quality 50)
  are the same for every image of one size and quality, so they are held once and counted once.

:class:`CompressedReplayBuffer` is an Avalanche ``ExemplarsBuffer``: class-balanced, each
class gets an equal share of ``mem_bytes`` (one byte per label included) and keeps a seeded
random sample of its images that fits; shares shrink as classes arrive by dropping the
last-drawn exemplars. Use it as ``ReplayPlugin(storage_policy=CompressedReplayBuffer(...))``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_classification_dataset
from avalanche.training.storage_policy import ExemplarsBuffer
from . import jpeg
from .avalanche import _LabelledImages, _resolution_view, dataset_tensors, replay_transform
from .buffer import decode_upsample, pack_levels, unpack_levels

__all__ = ["CompressedReplayBuffer", "CODECS"]

CODECS = ("downsample", "jpeg")


class CompressedReplayBuffer(ExemplarsBuffer):
    """Class-balanced real exemplars held compressed, within a budget in bytes.

    Args:
        mem_bytes: total bytes held (encoded pixels + one byte per label).
        dataset_meta: ``dataset_info(name).meta()`` (mean / std to recover uint8 pixels).
        codec: ``"downsample"`` or ``"jpeg"``.
        factor: downsampling factor (``downsample``).
        quality: JPEG quality 1-100 (``jpeg``).
        seed: which exemplars are drawn.
        augment: replay every held image through DSA's random transforms for the dataset
            (:class:`replaykit.augment.ReplayAugment`), as distilled replay can.
    """

    def __init__(self, mem_bytes: int, dataset_meta: dict[str, Any], *, codec: str = "downsample", factor: int = 2,
                 quality: int = 50, bits: int = 8, seed: int = 0, augment: bool = False) -> None:
        if not isinstance(mem_bytes, int) or isinstance(mem_bytes, bool) or mem_bytes < 1:
            raise ValueError(f"mem_bytes must be a positive int, got {mem_bytes!r}")
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
        if not {"mean", "std"} <= set(dataset_meta):
            raise ValueError("dataset_meta must hold the dataset's mean and std (dataset_info(name).meta())")
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be a positive int, got {factor!r}")
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"bits must be one of 1, 2, 4, 8, got {bits!r}")
        if bits != 8 and codec != "downsample":
            raise ValueError("bits applies to codec='downsample' (use factor=1 to keep the full resolution)")
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must lie in [1, 100], got {quality!r}")
        super().__init__(max_size=1)  # Avalanche's image count is not the budget here; mem_bytes is
        self.mem_bytes, self.codec, self.factor, self.quality, self.bits, self.seed = mem_bytes, codec, factor, int(quality), bits, seed
        self.mean = torch.tensor(dataset_meta["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(dataset_meta["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self._held: dict[int, list[torch.Tensor]] = {}  # class -> encoded exemplars in draw order
        self._header: torch.Tensor | None = None  # JPEG headers + tables shared by every held image
        self._cache: AvalancheDataset | None = None
        self.augment, self._dataset, self._updates = bool(augment), dataset_meta.get("dataset"), 0

    # ------------------------------------------------------------- codec
    def _encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        pixels = (images * self.std + self.mean).clamp(0, 1)
        self._small_size = (images.shape[-2] // self.factor, images.shape[-1] // self.factor)
        if self.codec == "downsample":
            small = torch.nn.functional.avg_pool2d(pixels, self.factor) if self.factor > 1 else pixels
            levels = (small * (2 ** self.bits - 1)).round().to(torch.uint8)
            return list(levels if self.bits == 8 else pack_levels(levels, self.bits))
        self._header, bodies = jpeg.encode((pixels * 255).round().to(torch.uint8), self.quality, self._header)
        return bodies

    def _decode(self, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.codec == "downsample":
            stacked = torch.stack(list(codes))
            if self.bits < 8:
                c, h, w = self.mean.shape[1], *self._small_size
                stacked = unpack_levels(stacked, self.bits, c * h * w).reshape(-1, c, h, w)
            pixels = decode_upsample(stacked.float() / (2 ** self.bits - 1), self.factor)
        else:
            pixels = jpeg.decode(self._header, list(codes), self.mean.shape[1]).float() / 255.0
        return (pixels - self.mean) / self.std

    def view(self, images: torch.Tensor) -> torch.Tensor | None:
        """Normalised ``images`` as this buffer's codec gives them back (for :class:`replaykit.avalanche.MixedViewPlugin`)."""
        if self.codec == "jpeg":  # the codec runs on the host; the view goes back to the batch's device
            return jpeg.roundtrip(images.cpu(), self.quality, self.mean, self.std).to(images.device)
        return _resolution_view(images, self.factor)

    @staticmethod
    def _cost(code: torch.Tensor) -> int:
        return int(code.numel()) + 1  # encoded bytes + a one-byte label

    # -------------------------------------------------------- Avalanche API
    @property
    def buffer(self) -> AvalancheDataset:
        if not any(self._held.values()):
            return AvalancheDataset([])
        if self._cache is None:
            classes = sorted(self._held)
            images = torch.cat([self._decode(self._held[c]) for c in classes if self._held[c]])
            labels = torch.tensor([c for c in classes for _ in self._held[c]], dtype=torch.int64)
            transform = replay_transform(self.augment, self._dataset, self.seed * 4_099 + self._updates)
            self._cache = _make_taskaware_classification_dataset(_LabelledImages(images, labels, transform), task_labels=0)
        return self._cache

    @buffer.setter
    def buffer(self, new_buffer: AvalancheDataset) -> None:
        self._cache = None

    def post_adapt(self, agent_state: Any, exp: Any) -> None:
        images, labels = dataset_tensors(exp.dataset)
        self.update_from_tensors(images, labels)

    def update_from_tensors(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Add the classes of ``(images, labels)`` and re-balance every class to its byte share."""
        classes = sorted(set(self._held) | {int(c) for c in torch.unique(labels)})
        if self.codec == "jpeg" and self._header is None:
            self._encode(images[:1])  # learn the shared header, so its bytes come off the budget first
        share = (self.mem_bytes - self._header_bytes()) // len(classes)
        for cls in sorted(int(c) for c in torch.unique(labels)):
            idx = torch.nonzero(labels == cls).flatten()
            gen = torch.Generator().manual_seed(self.seed * 7919 + cls)
            idx = idx[torch.randperm(idx.numel(), generator=gen)]
            codes = list(self._held.get(cls, []))
            for start in range(0, idx.numel(), 256):  # encode in chunks until the share is full
                if sum(self._cost(c) for c in codes) > share:
                    break
                codes.extend(self._encode(images[idx[start:start + 256]]))
            self._held[cls] = codes
        for cls in classes:  # every class to its share: the first-drawn exemplars that fit
            kept, used = [], 0
            for code in self._held[cls]:
                if used + self._cost(code) > share:
                    break
                kept.append(code)
                used += self._cost(code)
            self._held[cls] = kept
        self._cache = None
        self._updates += 1

    def resize(self, strategy: Any, new_size: int) -> None:
        raise NotImplementedError("CompressedReplayBuffer is sized in bytes: set mem_bytes")

    def nbytes(self) -> int:
        """Bytes held: encoded exemplars plus one byte per label (and the shared JPEG header once)."""
        return self._header_bytes() + sum(self._cost(c) for codes in self._held.values() for c in codes)

    def _header_bytes(self) -> int:
        return 0 if self._header is None else int(self._header.numel())

    def __len__(self) -> int:
        return sum(len(v) for v in self._held.values())
