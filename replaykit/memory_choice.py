"""Distill, mix, or select? The plugin's honest choice of what a replay buffer holds, per class budget.

Distilled images earn their bytes only where the budget is tight: the more images a class keeps, the
closer a random real subset comes (Hybrid Memory Replay, arXiv 2410.15372; "A Label is Worth a Thousand
Images", arXiv 2406.10485), and held logits carry most of what is left. ``DistilledReplayPlugin(method="auto")``
looks the class budget up in :data:`CHOICES` by raw images per class, image kind (grey or colour) and epochs per
experience, a table written from what ``benchmarks/bytes_sweep.py`` measured on the validation split (never on test),
holds what it says, logs the choice and records it in the buffer's metadata (``memory_choice``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from .typed import check_positive_int

__all__ = ["MemoryChoice", "CHOICES", "choose_memory"]

log = logging.getLogger("replaykit")


@dataclass(frozen=True)
class MemoryChoice:
    """What a buffer holds for a class budget (the whole pipeline), and the measurement that decided it."""

    mode: str  # "distill", "hybrid" or "select"
    method: str
    method_options: dict[str, Any] = field(default_factory=dict)
    core: float | None = None  # distilled share of the final per-class quota (distill: 1.0, hybrid: < 1)
    fill: str = "random"  # how a hybrid picks its real images (a selecting method)
    recompress: str = "prefix"
    storage: str = "uint8"
    jpeg_quality: int = 50
    logits: bool = True
    learner_aware: bool = False  # the learner at the end of the experience as an extra feature extractor
    evidence: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: (channels, most raw images per class, most epochs per experience, choice), smallest budgets first per image kind;
#: the first row of the images' kind whose bounds hold the budget and the epochs wins. A raw image is the uint8 pixels of
#: one image plus a one-byte label (MNIST 785 B, CIFAR-10 3,073 B). Every row names the validation runs it rests on
#: (validation split of the training set, seed 0, never the test set; benchmarks/log/JOURNAL.md).
CHOICES: tuple[tuple[int, float, float, MemoryChoice], ...] = (
    (1, 1.0, 1, MemoryChoice(
        "distill", "dm", {"factor": 2, "bits": 2, "iterations": 1500}, core=1.0,
        evidence="1 raw image per class (MNIST / Fashion-MNIST 7,850 B), 1 epoch per experience: dm learned through half resolution and 2-bit grey "
                 "levels for the final quota, with held logits, 1,500 iterations: 93.67 / 78.43 (500 iterations 93.98 / 77.30, "
                 "herding start 93.87 / 77.02, 4-bit 93.05 / 73.70) vs its random twin 92.73 / 70.35, herding twin 93.68 / "
                 "73.40, and the best real row (random real images as JPEG q2 + logits) 93.72 / 74.55",
    )),
    (1, 1.0, float("inf"), MemoryChoice(
        "select", "herding", storage="jpeg", jpeg_quality=2,
        evidence="5 epochs per experience at 1 raw image per class (7,850 B), JPEG q2 + logits unless named: herding "
                 "95.32 / 77.67 (MNIST / Fashion-MNIST), dm learned for those codes for the final quota 95.27 / 77.80 "
                 "(270-316 s against herding's 55 s), a hybrid (a tenth of the quota so distilled) 95.55 / 75.00, recode "
                 "95.12 / 73.80, random 95.22 / 72.43, and the 1-epoch choice (dm at half resolution and 2 bits) 89.28 / "
                 "62.40: no distilled row leads on both datasets, so herding's selection is kept; below 1 raw image per "
                 "class with more than 1 epoch nothing is validated yet",
    )),
    (1, float("inf"), 1, MemoryChoice(
        "select", "herding", storage="jpeg", jpeg_quality=2,
        evidence="1 epoch, "
                 "10 raw images per class (78,500 B): herding-selected real images as JPEG q2 + logits 95.48 / 79.48 "
                 "(MNIST / Fashion-MNIST; 55-57 s of feature nets), random ones 95.30 / 79.23, a hybrid with a herding "
                 "fill 95.05 / 79.70, dm for the final quota learned for those JPEG codes 95.42 / 78.28, the same dm "
                 "JPEG-coded afterwards (5 epochs, MNIST) 95.40 vs 95.13, dm at half resolution and 2 bits 95.25 / 77.40, "
                 "a hybrid (a tenth of the quota distilled, the rest random) 95.35 / 79.07; distilled for the learner (256 "
                 "real images per class and iteration, the learner as an extra feature extractor): hybrid 95.43 / 78.77, "
                 "hybrid learned for JPEG q2 95.17 / 78.85, dm for the quota 95.30 / 77.72; recode (herding's picks "
                 "re-learned for their JPEG q2 codes) 95.20 / 79.50, with the learner 95.50 / 79.03: no distilled row "
                 "pays for its distillation time there. Means of validation seeds 0-1: herding 95.33 / 78.32, random "
                 "95.19 / 78.33, boundary anchors (real images moved to the learner's margin 0.5, 0.3 of the quota) "
                 "95.43 / 77.88, dm learned beside its real fill 94.93 / 77.40, the dm hybrid 95.11 / 77.18, boundary "
                 "anchors for the whole quota from the random twin's picks, moved only once 6 classes are known "
                 "(min_seen=6) 95.38 / 78.50 (the best validation mean on both datasets, but on the test set 96.07 / "
                 "78.70 against random 95.69 / 78.99, and validated at this budget only: herding is kept); recode "
                 "from the random twin's own picks 78.58 against that twin's 78.74 (Fashion-MNIST, seeds 0-7). "
                 "2.5 raw images per class (19,625 B): herding 95.40 / 78.47, random "
                 "95.08 / 78.43, recode 94.88 / 78.32, the hybrid 94.98 / 78.02; 5 (39,250 B): herding 95.12 / 79.27, random "
                 "95.02 / 78.75, recode 94.95 / 79.25, the hybrid 94.93 / 78.68; 20 (157,000 B): herding 95.53 / 80.10, "
                 "random 95.32 / 79.87, recode 95.53 / 79.32, the hybrid 95.33 / 79.55",
    )),
    (1, float("inf"), float("inf"), MemoryChoice(
        "hybrid", "dm", {"jpeg_quality": 2, "iterations": 500}, core=0.1, storage="jpeg", jpeg_quality=2,
        evidence="5 epochs per experience at 10 raw images per class (78,500 B), JPEG q2 + logits: a hybrid (a tenth of "
                 "the quota dm learned for those codes, 92-97 s, the rest random real images) 97.72 / 83.63 (MNIST / "
                 "Fashion-MNIST) against random 97.83 / 81.75 and herding 97.70 / 79.55 (64 s): the best mean of the "
                 "two datasets, -0.11 / +1.88 against the better real row; between 1 and 10 raw images per class, "
                 "and above 10, nothing is validated with more than 1 epoch yet",
    )),
    (3, 1.0, float("inf"), MemoryChoice(
        "distill", "dm", {"jpeg_quality": 2, "iterations": 500, "real_batch": 256}, core=1.0, storage="jpeg", jpeg_quality=2,
        learner_aware=True,
        evidence="1 raw image per class (CIFAR-10 30,730 B), 1 epoch per experience (more epochs not validated yet): dm for the final quota learned through a differentiable JPEG "
                 "q2 (replaykit.jpeg_sim) with 256 real images per class and iteration and the learner as an extra feature "
                 "extractor, held as JPEG q2 codes + logits: 40.82 (without the learner 39.92; 64 real images 39.56; 1,000 / "
                 "1,500 iterations 40.04 / 39.90 at two / three times the cost; from herding's picks 38.96) vs the same dm "
                 "JPEG-coded afterwards 38.72, "
                 "its herding twin 37.26, random twin 36.80; dm at half resolution and 2 bits 34.12 (random twin 29.56), "
                 "quarter resolution 4 bits 34.96 (31.34), 2 bits 32.16 (27.82)",
    )),
    (3, float("inf"), float("inf"), MemoryChoice(
        "select", "herding", storage="jpeg", jpeg_quality=2,
        evidence="10 raw images per class (CIFAR-10 307,300 B), 1 epoch per experience, JPEG q2 + logits: a hybrid (dm learned for those codes "
                 "for a tenth of the quota) with a herding fill 41.82, with a random fill 41.72, the same distilled for the "
                 "learner (256 real images per class and iteration) 42.04 / 42.00, herding 41.68, random 41.04; with "
                 "one validation seed these lie within 1.0 point, and the hybrids cost 330-1,030 s of distillation "
                 "per run against herding's 125 s of feature nets, so herding's selection is kept; between 1 and 10 raw "
                 "images per class nothing is validated yet",
    )),
)


def choose_memory(bytes_per_class: float, in_shape: tuple[int, ...] | list[int], epochs: int = 1) -> MemoryChoice:
    """The :data:`CHOICES` row for ``bytes_per_class`` (total bytes / classes of the stream) of images shaped ``in_shape``,
    learned for ``epochs`` epochs per experience.

    Grey images (1 channel) read the grey rows, anything else the colour rows.
    """
    if not bytes_per_class > 0:
        raise ValueError(f"bytes_per_class must be > 0, got {bytes_per_class!r}")
    shape = tuple(int(v) for v in in_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"in_shape must be (channels, height, width), got {in_shape!r}")
    check_positive_int("epochs", epochs)
    raw_images = bytes_per_class / (shape[0] * shape[1] * shape[2] + 1)
    kind = 1 if shape[0] == 1 else 3
    for channels, bound, most_epochs, choice in CHOICES:
        if channels == kind and raw_images <= bound and epochs <= most_epochs:
            log.info("replaykit: %.0f bytes per class (%.2f raw images of %s), %d epoch(s) per experience -> %s (%s): %s",
                     bytes_per_class, raw_images, "x".join(map(str, shape)), epochs, choice.mode, choice.method, choice.evidence)
            return choice
    raise AssertionError("CHOICES ends each image kind with an unbounded row")
