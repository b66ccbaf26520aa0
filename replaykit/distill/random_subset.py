"""``random``: a uniformly random subset of real images per class (the floor every method must beat)."""

from __future__ import annotations

import torch

from .base import DistillResult, Distiller


class RandomSubset(Distiller):
    name = "random"
    selects = True

    def _distill(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int], num_classes: int) -> DistillResult:
        gen = torch.Generator().manual_seed(self.seed)
        picked = []
        for cls in classes:
            idx = torch.nonzero(labels == cls).flatten()
            picked.append(idx[torch.randperm(idx.numel(), generator=gen)[: self.ipc]])
        index = torch.cat(picked)
        return DistillResult(images[index].clone(), labels[index].clone(), labels[index].clone())
