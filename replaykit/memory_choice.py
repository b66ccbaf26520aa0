"""Distill, mix, or select? The plugin's honest choice of what a replay buffer holds, per class budget.

Distilled images earn their bytes only where the budget is tight: the more images a class keeps, the
closer a random real subset comes (Hybrid Memory Replay, arXiv 2410.15372; "A Label is Worth a Thousand
Images", arXiv 2406.10485), and held logits carry most of what is left. ``DistilledReplayPlugin(method="auto")``
looks the class budget up in :data:`CHOICES`, a table written from what ``benchmarks/bytes_sweep.py``
measured on the validation split (never on test), holds what it says, logs the choice and records it in
the buffer's metadata (``memory_choice``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["MemoryChoice", "CHOICES", "choose_memory"]

log = logging.getLogger("replaykit")


@dataclass(frozen=True)
class MemoryChoice:
    """What a buffer holds for a class budget (the whole pipeline), and the measurement that decided it."""

    mode: str  # "distill", "hybrid" or "select"
    method: str
    method_options: dict[str, Any] = field(default_factory=dict)
    core: float | None = None  # distilled share of the final per-class quota (distill: 1.0, hybrid: < 1)
    recompress: str = "prefix"
    storage: str = "uint8"
    jpeg_quality: int = 50
    logits: bool = True
    evidence: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: (most bytes per class, choice), smallest budgets first; the first row whose bound holds the budget wins.
#: Every row names the validation runs it rests on (benchmarks/log/JOURNAL.md, "Where distillation earns its bytes").
CHOICES: tuple[tuple[float, MemoryChoice], ...] = (
    (785.0, MemoryChoice(
        "distill", "dm", {"factor": 2, "bits": 2, "iterations": 1500}, core=1.0,
        evidence="785 B/class (7,850 B), validation split, seed 0, 1 epoch: dm learned through half resolution and 2-bit grey "
                 "levels for the final quota, with held logits, 1,500 iterations: 93.67 / 78.43 (MNIST / Fashion-MNIST; 500 "
                 "iterations 93.98 / 77.30, herding start 93.87 / 77.02, 4-bit 93.05 / 73.70) vs its random twin 92.73 / 70.35, "
                 "herding twin 93.68 / 73.40, and the best real row (random real images as JPEG q2 + logits) 93.72 / 74.55",
    )),
    (float("inf"), MemoryChoice(
        "select", "random", storage="jpeg", jpeg_quality=2,
        evidence="7,850 B/class (78,500 B), validation proxy (MNIST, 5 epochs): dm as JPEG q2 + logits 95.40 vs random real "
                 "images held the same way 95.13, a tie that does not pay for the distillation time; random real images as "
                 "JPEG q2 + logits are the strongest real row there; the test sweep agrees (78,500 B, 3 seeds: dm for the final "
                 "quota 95.57 / 78.42 vs random twin 95.69 / 78.99, MNIST / Fashion-MNIST)",
    )),
)


def choose_memory(bytes_per_class: float) -> MemoryChoice:
    """The :data:`CHOICES` row for a budget of ``bytes_per_class`` (total bytes / classes of the stream)."""
    if not bytes_per_class > 0:
        raise ValueError(f"bytes_per_class must be > 0, got {bytes_per_class!r}")
    for bound, choice in CHOICES:
        if bytes_per_class <= bound:
            log.info("replaykit: %.0f bytes per class -> %s (%s): %s", bytes_per_class, choice.mode, choice.method, choice.evidence)
            return choice
    raise AssertionError("CHOICES ends with an unbounded row")
