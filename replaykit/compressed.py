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
from . import codecs
from .avalanche import _LabelledImages, dataset_tensors, replay_transform
from .typed import check_positive_int

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
        check_positive_int("mem_bytes", mem_bytes)
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
        if not {"mean", "std"} <= set(dataset_meta):
            raise ValueError("dataset_meta must hold the dataset's mean and std (dataset_info(name).meta())")
        check_positive_int("factor", factor)
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
        # downsample: the clipped pixels are pooled, held as grey levels and upsampled before normalising again
        self.image_codec = codecs.compose(factor, codecs.for_storage("uint8", bits=bits, mean=self.mean, std=self.std), space="pixels") \
            if codec == "downsample" else codecs.for_storage("jpeg", quality=int(quality), mean=self.mean, std=self.std)
        self._held: dict[int, list[torch.Tensor]] = {}  # class -> encoded exemplars in draw order
        self._header: torch.Tensor | None = None  # JPEG headers + tables shared by every held image
        self._cache: AvalancheDataset | None = None
        self.augment, self._dataset, self._updates = bool(augment), dataset_meta.get("dataset"), 0

    # ------------------------------------------------------------- codec
    def _encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        self._image_shape = tuple(images.shape[1:])
        codes = self.image_codec.encode(images, self._header)
        if codes.header.numel():  # JPEG's headers and tables, shared by every held image
            self._header = codes.header
        return list(codes.bodies)

    def _decode(self, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        header = torch.zeros(0, dtype=torch.uint8) if self._header is None else self._header
        return self.image_codec.decode(codecs.Codes(list(codes), header), self._image_shape)

    def view(self, images: torch.Tensor) -> torch.Tensor | None:
        """Normalised ``images`` as this buffer's codec gives them back (for :class:`replaykit.avalanche.MixedViewPlugin`)."""
        return self.image_codec.view(images)

    def _cost(self, code: torch.Tensor) -> int:
        return self.image_codec.body_nbytes(code) + codecs.label_row_bytes()  # encoded bytes + a one-byte label

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
        if self._header is None:
            self._encode(images[:1])  # a codec's shared header (JPEG's) is learned first, so its bytes come off the budget first
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
        held = [c for codes in self._held.values() for c in codes]
        header = torch.zeros(0, dtype=torch.uint8) if self._header is None else self._header
        return self.image_codec.nbytes(codecs.Codes(held, header)) + len(held) * codecs.label_row_bytes()

    def _header_bytes(self) -> int:
        return 0 if self._header is None else int(self._header.numel())

    def __len__(self) -> int:
        return sum(len(v) for v in self._held.values())
