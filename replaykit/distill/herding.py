"""``herding``: per class, greedily pick the real images whose running mean embedding tracks the class mean.

The selection of iCaRL (Rebuffi et al. 2017, after Welling 2009): the chosen
set's mean feature approximates the whole class's mean, which is what a
nearest-mean classifier and, roughly, a linear head need. Features come from a
ConvNet briefly trained on the data by default (see
:func:`~replaykit.distill.features.selection_features`).
"""

from __future__ import annotations

import torch

from .features import FeatureSelection

__all__ = ["Herding", "herding_order"]


def herding_order(features: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (into ``features``) of ``count`` distinct rows chosen by herding."""
    target = features.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(target)
    available = torch.ones(features.shape[0], dtype=torch.bool)
    for k in range(1, count + 1):
        # mean after adding candidate i: (running + f_i) / k; pick the closest to the class mean
        dist = ((target - (running[None] + features) / k) ** 2).sum(1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        running += features[i]
    return torch.tensor(chosen, dtype=torch.int64)


class Herding(FeatureSelection):
    """Args: ``feature`` ("trained" | "random"), ``feature_width``, ``feature_epochs`` (see ``selection_features``)."""

    name = "herding"
    order = staticmethod(herding_order)
