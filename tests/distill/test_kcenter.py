"""``kcenter``: its ordering; the checks it shares with the other selection baseline are in test_selection.py."""

from __future__ import annotations

import torch


def test_kcenter_order_covers_the_extremes():
    from replaykit.distill.kcenter import kcenter_order

    feats = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [-5.0, 0.0], [0.0, 0.1]])
    order = kcenter_order(feats, 3).tolist()
    assert order == [0, 2, 3]  # start nearest the mean, then the two farthest points
