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
    """What a buffer holds for a class budget, and the measurement that decided it."""

    mode: str  # "distill", "hybrid" or "select"
    method: str
    method_options: dict[str, Any] = field(default_factory=dict)
    core: float | None = None  # distilled share of the final per-class quota (distill: 1.0, hybrid: < 1)
    recompress: str = "prefix"
    evidence: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: (most bytes per class, choice), smallest budgets first; the first row whose bound holds the budget wins.
#: Every row names the validation runs it rests on (benchmarks/RESULTS.md, "Where distillation earns its bytes").
CHOICES: tuple[tuple[float, MemoryChoice], ...] = (
    (float("inf"), MemoryChoice(
        "select", "random",
        evidence="785 B/class (7,850 B), JPEG q2 + logits, validation split seed 0: random 93.72 / 74.55 vs dm distilled for the "
                 "final quota 93.50 / 72.80 (MNIST / Fashion-MNIST); no distilled or hybrid setting beat its random twin",
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
