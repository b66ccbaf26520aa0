"""The selection baselines ``herding`` and ``kcenter``: real images of the right class, picked
deterministically, that beat random selection. Each method's own ordering is tested in its file."""

from __future__ import annotations

import pytest
import torch

from replaykit import distill

pytestmark = pytest.mark.parametrize("method", ["herding", "kcenter"])


def test_selection_beats_random_at_equal_ipc(method, mnist_small, quick_accuracy, random_accuracy):
    x, y, xt, yt = mnist_small
    buf = distill.make(method, ipc=1, seed=0, feature_epochs=1, progress=False).distill(x, y, meta={"dataset": "mnist"})
    acc, acc_random = quick_accuracy(buf, xt, yt), random_accuracy
    print(f"{method} {acc:.3f} random {acc_random:.3f}")
    # Measured on this seed: herding and kcenter 0.928 vs random 0.623; assert a safe part of the margin.
    assert acc >= acc_random + 0.1
    for img, c in zip(buf.images, buf.class_ids):
        assert any(torch.equal(img, r) for r in x[y == c])


def test_same_seed_same_selection_and_distinct_images(method, digits):
    x, y, _, _ = digits
    a = distill.make(method, ipc=5, seed=2, feature_epochs=1, progress=False).distill(x, y)
    b = distill.make(method, ipc=5, seed=2, feature_epochs=1, progress=False).distill(x, y)
    assert torch.equal(a.images, b.images)
    for c in range(10):
        imgs = a.images[a.indices_of(c)].flatten(1)
        assert torch.unique(imgs, dim=0).shape[0] == 5  # no image picked twice


def test_random_feature_space_and_bad_options(method, digits):
    x, y, _, _ = digits
    buf = distill.make(method, ipc=2, feature="random", progress=False).distill(x, y)
    assert buf.meta["feature"] == "random" and len(buf) == 20
    with pytest.raises(ValueError, match="feature"):
        distill.make(method, feature="pixels")
