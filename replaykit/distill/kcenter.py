"""``kcenter``: per class, greedy k-center (farthest-point) selection in an embedding space.

Covers the class: every real image ends up near some chosen one (Sener &
Savarese 2018, the coreset baseline of the dataset-distillation papers). It
starts from the image closest to the class mean, so the result is deterministic
given the features; features as for herding (a briefly trained ConvNet by default).
"""

from __future__ import annotations

import torch

from .features import FeatureSelection

__all__ = ["KCenter", "kcenter_order"]


def kcenter_order(features: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of ``count`` rows chosen greedily to minimise the largest distance to a chosen row."""
    first = int(((features - features.mean(0)) ** 2).sum(1).argmin())
    chosen = [first]
    min_dist = ((features - features[first]) ** 2).sum(1)
    for _ in range(count - 1):
        i = int(min_dist.argmax())
        chosen.append(i)
        min_dist = torch.minimum(min_dist, ((features - features[i]) ** 2).sum(1))
    return torch.tensor(chosen, dtype=torch.int64)


class KCenter(FeatureSelection):
    """Args: ``feature`` ("trained" | "random"), ``feature_width``, ``feature_epochs`` (see ``selection_features``)."""

    name = "kcenter"
    order = staticmethod(kcenter_order)
