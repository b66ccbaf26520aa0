"""``recode``: selected real images re-learned for the codec the buffer keeps.

Where a class keeps many images (about 100 or more), distilled sets lose their edge over selected real
images (Hybrid Memory Replay, arXiv 2410.15372), so the count and the diversity of a real subset are worth
keeping. What the real subset loses is in the codec: at JPEG q2 little more than each 8x8 block's mean
survives. This method starts from selected real images (herding's picks by default) and learns, for each,
pixels whose *decoded* codes look like that original to a new random ConvNet every iteration (and to the
learner, when given), under the same augmentation: one-to-one feature matching through the codec, where
``dm`` matches class means. The buffer holds about as many images as its twin (the learned codes are a few
per cent larger), each carrying more of what a network sees in its original than the quantiser keeps.
"""

from __future__ import annotations

import torch

from .base import DistillResult
from .dm import MatchingDistiller
from .random_subset import random_picks
from ..typed import check_positive_int

__all__ = ["Recode"]


class Recode(MatchingDistiller):
    """``recode``: per-image feature matching of selected real images through the buffer's codec.

    Extra args (besides :class:`~replaykit.distill.dm.MatchingDistiller`'s; set ``jpeg_quality`` or ``bits`` /
    ``factor`` to the buffer's storage, else there is nothing to learn):
        pairs: images per class matched per iteration (a random subset of the class's set).
    ``init`` is ``"herding"`` (default), ``"real"`` (a seeded random draw) or ``"random"``: exactly the images the
    ``random`` method keeps with the same seed and count, i.e. what a buffer's random twin holds, so the comparison
    with that twin is paired and measures what the re-learning alone adds. ``real_batch`` is not used.
    """

    name = "recode"

    def __init__(self, ipc: int = 10, *, pairs: int = 64, init: str = "herding", iterations: int = 200, **options) -> None:
        if init not in ("herding", "real", "random"):
            raise ValueError(f"recode starts from real images: init must be 'herding', 'real' or 'random', got {init!r}")
        if options.pop("batch_classes", None):
            raise ValueError("recode matches each class's own pairs: batch_classes=True is not supported")
        check_positive_int("pairs", pairs)
        super().__init__(ipc, init="real" if init == "random" else init, iterations=iterations, batch_classes=False, **options)
        self.init = init
        self.pairs = pairs
        self._origin: dict[int, torch.Tensor] = {}  # per class, the real images the learned ones started from

    def _distill(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int], num_classes: int) -> DistillResult:
        if self.init == "random":  # drawn for all classes at once: one seeded stream, as the random method draws it
            self._origin = random_picks(labels, classes, self.ipc, self.seed)
        return super()._distill(images, labels, classes, num_classes)

    def _start_index(self, images: torch.Tensor, index: torch.Tensor, cls: int) -> torch.Tensor:
        if self.init != "random":
            self._origin[cls] = super()._start_index(images, index, cls)
        return self._origin[cls]

    def _class_pair(self, images: torch.Tensor, index: torch.Tensor, syn: torch.Tensor, gen: torch.Generator,
                    cls: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``pairs`` originals of the class and their learned images, decoded."""
        pick = torch.randperm(syn.shape[0], generator=gen)[: self.pairs]
        return images[self._origin[cls][pick]], self._decoded(syn[pick.to(syn.device)])

    def match_loss(self, net, real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
        """Mean over pairs of the squared distance between an original's embedding and its decoded code's."""
        with torch.no_grad():
            target = net.embed(real)
        return ((target - net.embed(syn)) ** 2).sum(1).mean()
