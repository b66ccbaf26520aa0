"""Operations on the held images of a class: matching picked rows, holding real images at a lower resolution,
soft-label rows as float16 keeps them, and widening a buffer's label space."""

from __future__ import annotations

import torch

from .. import codecs
from ..buffer import SyntheticBuffer

__all__: list[str] = []


def _match_rows(pool: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """Indices into ``pool`` of the images in ``picked`` (each pool row used at most once)."""
    flat_pool, used, index = pool.flatten(1), torch.zeros(pool.shape[0], dtype=torch.bool), []
    for row in picked.flatten(1):
        hits = torch.nonzero((flat_pool == row).all(1) & ~used).flatten()
        if hits.numel() == 0:
            raise RuntimeError("a selecting distiller returned an image that is not in its input")
        used[hits[0]] = True
        index.append(int(hits[0]))
    return torch.tensor(index, dtype=torch.int64)


def _downsampled(part: SyntheticBuffer, factor: int) -> SyntheticBuffer:
    """Real images of ``part`` held at ``1/factor`` resolution (average-pooled), decoded by bilinear upsampling."""
    if factor == 1:
        return part
    meta = dict(part.meta, decoder=codecs.decoder_meta(factor))
    return SyntheticBuffer(torch.nn.functional.avg_pool2d(part.images, factor), part.labels, part.num_classes, part.class_ids, meta)


def _float16_rows(probs: torch.Tensor) -> torch.Tensor:
    """Probability rows as float16 keeps them (renormalised in float32 so they still sum to one)."""
    held = probs.half().float().clamp_min(0)
    return held / held.sum(1, keepdim=True)


def _pad(buffer: SyntheticBuffer, num_classes: int) -> SyntheticBuffer:
    """The same buffer over a label space of ``num_classes`` (soft rows padded with zeros)."""
    if buffer.num_classes == num_classes:
        return buffer
    labels = buffer.labels
    if buffer.is_soft:
        labels = torch.nn.functional.pad(labels, (0, num_classes - buffer.num_classes))
    return buffer.relabelled(labels, num_classes)
