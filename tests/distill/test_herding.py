"""``herding``: its ordering; the checks it shares with the other selection baseline are in test_selection.py."""

from __future__ import annotations

import torch


def test_herding_order_tracks_the_mean():
    from replaykit.distill.herding import herding_order

    feats = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1.0, 1.0], [-1.0, -1.0]])
    # mean (2.5, 0): first (1, 1) is nearest; then (0, 0) brings the running mean closest; then (10, 0)
    assert herding_order(feats, 3).tolist() == [2, 0, 1]
