"""``dm-multi``: distribution matching on several layers.

Matching only the final embedding's mean leaves the intermediate statistics
free; matching the per-channel means (and, optionally, variances) of every
conv block's feature map as well constrains the synthetic images at several
scales, in the spirit of the layer-wise matching of CAFE and IDM. Everything
else (random networks, siamese DSA, per-class streams, budgets) is :mod:`dm`'s loop.
"""

from __future__ import annotations

import torch

from .dm import MatchingDistiller

__all__ = ["MultiLayerDistributionMatching"]


class MultiLayerDistributionMatching(MatchingDistiller):
    """``dm-multi``: match per-channel statistics of every conv block plus the mean embedding.

    Extra args (besides :class:`~replaykit.distill.dm.MatchingDistiller`'s):
        match_variance: also match per-channel variances of the feature maps.
        layer_weight: weight of each intermediate layer's term relative to the embedding term.
    """

    name = "dm-multi"

    def __init__(self, ipc: int = 10, *, match_variance: bool = True, layer_weight: float = 1.0, **options) -> None:
        super().__init__(ipc, **options)
        if not layer_weight >= 0:
            raise ValueError(f"layer_weight must be >= 0, got {layer_weight!r}")
        self.match_variance = bool(match_variance)
        self.layer_weight = float(layer_weight)

    def _statistics(self, net, x: torch.Tensor) -> list[torch.Tensor]:
        maps = net.feature_maps(x)
        stats = [maps[-1].flatten(1).mean(0)]  # the embedding (flattened last map), as in dm
        for fmap in maps[:-1] if len(maps) > 1 else maps:
            per_channel = fmap.transpose(0, 1).flatten(1)  # [C, B*H*W]
            stats.append(per_channel.mean(1))
            if self.match_variance:
                stats.append(per_channel.var(1, unbiased=False))
        return stats

    def _grouped_statistics(self, net, x: torch.Tensor, groups: int) -> list[torch.Tensor]:
        """:meth:`_statistics` of each of ``groups`` equal blocks of ``x`` at once, each ``[groups, ...]``."""
        maps = net.feature_maps(x)
        stats = [maps[-1].flatten(1).view(groups, -1, maps[-1][0].numel()).mean(1)]
        for fmap in maps[:-1] if len(maps) > 1 else maps:
            per_channel = fmap.view(groups, -1, *fmap.shape[1:]).transpose(1, 2).flatten(2)  # [G, C, B*H*W]
            stats.append(per_channel.mean(2))
            if self.match_variance:
                stats.append(per_channel.var(2, unbiased=False))
        return stats

    def match_loss_grouped(self, net, real: torch.Tensor, syn: torch.Tensor, groups: int) -> torch.Tensor:
        with torch.no_grad():
            real_stats = self._grouped_statistics(net, real, groups)
        syn_stats = self._grouped_statistics(net, syn, groups)
        loss = ((real_stats[0] - syn_stats[0]) ** 2).sum()
        for r, s in zip(real_stats[1:], syn_stats[1:]):
            loss = loss + self.layer_weight * ((r - s) ** 2).sum()
        return loss

    def match_loss(self, net, real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real_stats = self._statistics(net, real)
        syn_stats = self._statistics(net, syn)
        loss = ((real_stats[0] - syn_stats[0]) ** 2).sum()
        for r, s in zip(real_stats[1:], syn_stats[1:]):
            loss = loss + self.layer_weight * ((r - s) ** 2).sum()
        return loss
