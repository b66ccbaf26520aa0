"""``random``: a uniformly random subset of real images per class (the floor every method must beat)."""

from __future__ import annotations

import torch

from .base import DistillResult, Distiller


def random_picks(labels: torch.Tensor, classes: list[int], ipc: int, seed: int) -> dict[int, torch.Tensor]:
    """Per class (drawn in ``classes`` order from one seeded stream), the indices ``random`` keeps: methods that
    start from exactly what a buffer's random twin holds use this, so their comparison with that twin is paired."""
    gen = torch.Generator().manual_seed(seed)
    picks = {}
    for cls in classes:
        idx = torch.nonzero(labels == cls).flatten()
        picks[cls] = idx[torch.randperm(idx.numel(), generator=gen)[:ipc]]
    return picks


class RandomSubset(Distiller):
    name = "random"
    selects = True

    def _distill(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int], num_classes: int) -> DistillResult:
        index = torch.cat(list(random_picks(labels, classes, self.ipc, self.seed).values()))
        return DistillResult(images[index].clone(), labels[index].clone(), labels[index].clone())
