"""``boundary``: real images moved, through the buffer's codec, to just inside the learner's decision boundary.

Where a class keeps many images, typical real images already cover its distribution, and images learned to match
class means (``dm``) add little: their held logits say "certainly this class", which the learner already knows.
What a replay buffer with held logits must preserve is where the learner's boundaries are, and logits of images
near a boundary carry the most of that (Heo et al., "Knowledge Distillation with Adversarial Samples Supporting
Decision Boundary", AAAI 2019). This method starts from seeded random real images of each class and learns, for
each, pixels whose *stored and decoded* form the learner classifies correctly with a small margin: the learner's
logit of the class minus its best other logit is pulled to ``margin``. It needs the learner (``learner_aware``).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, ClassVar

import torch

from ..progress import progress_bar
from ..typed import check_positive_int
from .base import DistillResult
from .dm import MatchingDistiller
from .features import class_index, derive_seed
from .random_subset import random_picks

__all__ = ["BoundaryAnchors"]

#: JPEG's block side: with ``basis="blocks"`` one offset per block of the stored image.
_BLOCK = 8


class BoundaryAnchors(MatchingDistiller):
    """``boundary``: per image, the learner's margin of its stored form pulled to ``margin``.

    Extra args (besides :class:`~replaykit.distill.dm.MatchingDistiller`'s, of which ``iterations``, ``lr``,
    ``jpeg_quality`` / ``bits`` / ``factor``, ``learner`` and ``time_budget`` are used; set the stored form to the
    buffer's, so what is learned survives it):
        margin: the learner's logit margin (class minus best other) each learned image is pulled to; > 0 keeps it
            on its own class's side.
        side: which images move (decided from where they start): ``"both"`` (every image is pulled to
            ``margin``), ``"below"`` (only those under it are raised: images the learner gets wrong or barely right
            move onto their class's side, the rest stay the real images they were) or ``"above"`` (only those over
            it are lowered toward the boundary; the ones near or across it stay as they were).
        start: ``"real"`` (a seeded draw of the class's real images) or ``"random"``: exactly the images the
            ``random`` method picks with the same seed and count, i.e. what a buffer's random twin holds, so a
            comparison with that twin is paired (images that do not move are the twin's own).
        basis: ``"pixels"`` (every stored pixel moves) or ``"blocks"``: one offset per 8x8 block of the stored
            image, JPEG's own grid. Then only the blocks' means (their DC terms) change, about all that JPEG q2
            keeps, and a moved image's code grows no larger than its original's (moving pixels grew Fashion-MNIST's
            codes so that the buffer held ~5 % fewer images than its twin).
        min_seen: move images only once the learner has been trained on at least this many classes (``seen``,
            which a buffer sets: the classes it holds after the experience); before that the start images are kept
            as they are. A learner that knows two classes has one boundary: images moved to it at the first
            experience of Split-Fashion-MNIST (seed 1, coat beside bag) were the worst-anchored of the run (-15
            points on that experience against the random twin) while later experiences gained.
    Optimised with Adam (``lr`` in normalised pixel units, default 0.02); starts from real images (``init="real"``).
    """

    name = "boundary"
    #: It cannot run without the learner (a storage policy must be ``learner_aware``).
    needs_learner: ClassVar[bool] = True
    #: A buffer passes ``seen``, the number of classes the learner has been trained on.
    counts_seen_classes: ClassVar[bool] = True

    def __init__(self, ipc: int = 10, *, margin: float = 2.0, side: str = "both", start: str = "real",
                 basis: str = "pixels", min_seen: int = 0, seen: int | None = None, iterations: int = 50,
                 lr: float = 0.02, **options) -> None:
        if not (isinstance(margin, (int, float)) and not isinstance(margin, bool) and math.isfinite(margin) and margin > 0):
            raise ValueError(f"margin must be a positive number of logits, got {margin!r}")
        if options.get("init", "real") != "real":
            raise ValueError(f"boundary starts from random real images: init must be 'real', got {options['init']!r}")
        if options.pop("batch_classes", None):
            raise ValueError("boundary learns each image on its own: batch_classes=True is not supported")
        if start not in ("real", "random"):
            raise ValueError(f"boundary starts from real images: start must be 'real' or 'random', got {start!r}")
        if basis not in ("pixels", "blocks"):
            raise ValueError(f"basis must be 'pixels' or 'blocks', got {basis!r}")
        if not (isinstance(min_seen, int) and not isinstance(min_seen, bool) and min_seen >= 0):
            raise ValueError(f"min_seen must be an int >= 0, got {min_seen!r}")
        check_positive_int("seen", seen, allow_none=True)  # the classes the learner was trained on (a buffer sets it)
        if side not in ("both", "below", "above"):
            raise ValueError(f"side must be 'both', 'below' or 'above', got {side!r}")
        super().__init__(ipc, iterations=iterations, lr=lr, batch_classes=False, **options)
        self.margin = float(margin)
        self.side = side
        self.start = start
        self.basis = basis
        self.min_seen = min_seen
        self.seen = seen

    def _distill(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int], num_classes: int) -> DistillResult:
        if self._learner is None:
            raise ValueError("boundary moves images to the learner's boundary: it needs the learner (learner_aware=True)")
        start = time.perf_counter()
        learner = copy.deepcopy(self._learner).eval().requires_grad_(False).to(images.device)
        base = self._start_images(images, labels, classes)
        learned, moved = self._parameterised(base)
        ids = torch.tensor([c for c in classes for _ in range(self.ipc)], dtype=torch.int64)
        target = ids.to(images.device)
        moving = self._moving(learner, base, target)
        opt = torch.optim.Adam([learned], lr=self.lr)
        done, stopped_by, per_iter = 0, "iterations", 0.0
        bar = progress_bar(total=self.iterations, enabled=self.progress, desc=self.name, leave=False)
        for _ in range(self.iterations if bool(moving.any()) else 0):
            if self.time_budget is not None and done and time.perf_counter() - start + per_iter > self.time_budget:
                stopped_by = "time_budget"
                break
            opt.zero_grad(set_to_none=True)
            gap = self._margins(learner, self._decoded(moved()), target) - self.margin
            loss = (gap * moving).square().mean()
            loss.backward()
            opt.step()
            done += 1
            per_iter = (time.perf_counter() - start) / done
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3g}")
        bar.close()
        with torch.no_grad():
            syn = moved()
            reached = self._margins(learner, self._decoded(syn), target)
        extra = {"iterations_done": done, "stopped_by": stopped_by, "label_kind": "hard", "learner_aware": True,
                 "margin": self.margin, "side": self.side, "moved": int(moving.sum()), "start": self.start,
                 "basis": self.basis, "seen": self.seen, "margin_reached": round(float(reached.median()), 4),
                 **self._stored_form_meta()}
        return DistillResult(syn.detach(), ids.clone(), ids, extra)

    def _start_images(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
        """The real images each class starts from, ``ipc`` per class in class order, at the stored resolution."""
        if self.start == "random":  # the random twin's own picks, in its order
            picks = random_picks(labels, classes, self.ipc, self.seed)
            picked = torch.cat([images[picks[c]] for c in classes])
            return torch.nn.functional.avg_pool2d(picked, self.factor) if self.factor > 1 else picked
        gens = {c: torch.Generator().manual_seed(derive_seed(self.seed, c, 1)) for c in classes}
        return torch.cat([self._initial_images(images, class_index(labels, c), c, gens[c]) for c in classes])

    def _parameterised(self, base: torch.Tensor) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        """What Adam learns, and the images it stands for: the pixels themselves, or one offset per JPEG block."""
        if self.basis == "pixels":
            learned = base.clone().requires_grad_(True)
            return learned, lambda: learned
        h, w = base.shape[2:]
        offsets = torch.zeros(*base.shape[:2], -(-h // _BLOCK), -(-w // _BLOCK), device=base.device, requires_grad=True)
        return offsets, lambda: base + offsets.repeat_interleave(_BLOCK, 2).repeat_interleave(_BLOCK, 3)[:, :, :h, :w]

    def _moving(self, learner: torch.nn.Module, base: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """1 for each image that moves, 0 for one kept as it starts: decided once, from where the images start (with
        a one-sided loss, Adam's momentum would carry images past the margin and leave them there)."""
        if self.min_seen and (self.seen is None or self.seen < self.min_seen):
            return torch.zeros(len(base), device=base.device)  # too few classes known for a boundary worth learning
        if self.side == "both":
            return torch.ones(len(base), device=base.device)
        with torch.no_grad():
            gap = self._margins(learner, self._decoded(base), target) - self.margin
        return (gap < 0).float() if self.side == "below" else (gap > 0).float()

    @staticmethod
    def _margins(learner: torch.nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per image: the learner's logit of its class minus the largest other logit."""
        logits = learner(images)
        own = logits.gather(1, target[:, None]).squeeze(1)
        others = logits.scatter(1, target[:, None], float("-inf")).amax(1)
        return own - others
