"""The byte budget: what one held image costs, how many fit, and each class's share of them."""

from __future__ import annotations

from typing import Sequence

from .. import codecs
from ..typed import check_positive_int

__all__ = ["image_cost_bytes", "images_for_bytes", "class_quotas"]


def image_cost_bytes(in_shape: Sequence[int], *, factor: int = 1, storage: str = "uint8", bits: int = 8,
                     soft_classes: int = 0, logit_classes: int = 0) -> int:
    """Bytes one held image costs: its pixels at the stored resolution and precision plus a one-byte label.

    ``bits`` (uint8 storage only): grey levels of ``bits`` bits, packed ``8 // bits`` to a byte.
    ``soft_classes``: a float16 soft-label row over that many classes is held too.
    ``logit_classes``: the learner's logits over that many classes are held too (int8 each + a float16 scale).
    """
    return codecs.image_cost_bytes(in_shape, factor=factor, storage=storage, bits=bits, soft_classes=soft_classes,
                                   logit_classes=logit_classes)


def images_for_bytes(mem_bytes: int, in_shape: Sequence[int], *, factor: int = 1, storage: str = "uint8", bits: int = 8,
                     soft_classes: int = 0, logit_classes: int = 0) -> int:
    """How many images fit in ``mem_bytes`` (pixels + labels): 78,500 B hold 100 uint8 MNIST images, 398 at 2 bits."""
    check_positive_int("mem_bytes", mem_bytes)
    return mem_bytes // image_cost_bytes(in_shape, factor=factor, storage=storage, bits=bits, soft_classes=soft_classes,
                                         logit_classes=logit_classes)


def class_quotas(classes: Sequence[int], mem_size: int) -> dict[int, int]:
    """Split ``mem_size`` images over ``classes``: equal shares, remainder to the lowest ids."""
    classes = sorted(set(int(c) for c in classes))
    if not classes:
        return {}
    if mem_size < len(classes):
        raise ValueError(
            f"memory budget of {mem_size} images is smaller than the {len(classes)} classes seen so far "
            f"({classes}); every class needs at least one image: raise mem_size to >= {len(classes)}"
        )
    base, extra = divmod(mem_size, len(classes))
    return {c: base + (1 if i < extra else 0) for i, c in enumerate(classes)}
