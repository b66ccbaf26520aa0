"""Reference networks of the dataset-distillation literature.

Every network splits into ``features`` (image -> flat embedding) and ``classifier``
(one linear layer), so distillers can read embeddings with :meth:`embed` and the
edge exporter can freeze the feature extractor and train only the head.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["ConvNet", "MLP", "LeNet5", "make_network", "NETWORKS", "NetworkFactory"]

NetworkFactory = Callable[[], nn.Module]


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        # GroupNorm with one group per channel is instance norm with a learnable
        # affine transform, as in the DC/DSA/DM reference code.
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose 'instance', 'batch' or 'none'")


def _check_shape(in_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(in_shape) != 3 or any(int(s) <= 0 for s in in_shape):
        raise ValueError(f"in_shape must be (channels, height, width) with positive sizes, got {tuple(in_shape)}")
    c, h, w = (int(s) for s in in_shape)
    return c, h, w


class _Classifier(nn.Module):
    """Shared ``forward``/``embed`` for networks built as features + linear head."""

    features: nn.Module
    classifier: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flat embedding before the linear classifier (what DM matches)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def _finish(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        with torch.no_grad():
            dim = self.features(torch.zeros(1, *in_shape)).shape[1]
        self.embedding_dim = int(dim)
        self.in_shape = in_shape
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.embedding_dim, num_classes)


class ConvNet(_Classifier):
    """ConvNet-D: ``depth`` x [conv 3x3, norm, ReLU, 2x2 avg-pool] then one linear layer.

    Pooling stops once the feature map is 1 pixel wide, so any input size works
    (8x8 digits, 28x28 MNIST, 32x32 CIFAR).
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        width: int = 128,
        depth: int = 3,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        c, h, w = _check_shape(in_shape)
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        blocks: list[nn.Module] = []
        channels = c
        for _ in range(depth):
            block = [nn.Conv2d(channels, width, 3, padding=1), _norm_layer(norm, width), nn.ReLU(inplace=True)]
            if h > 1 and w > 1:
                block.append(nn.AvgPool2d(2))
                h, w = h // 2, w // 2
            blocks.append(nn.Sequential(*block))
            channels = width
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.width, self.depth, self.norm = width, depth, norm
        self._finish(_check_shape(in_shape), num_classes)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of every conv block, for multi-layer distribution matching."""
        maps = []
        for block in self.features[:-1]:
            x = block(x)
            maps.append(x)
        return maps


class MLP(_Classifier):
    """Two hidden layers of ``hidden`` units with ReLU."""

    def __init__(self, in_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, hidden: int = 128) -> None:
        super().__init__()
        c, h, w = _check_shape(in_shape)
        self.features = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True)
        )
        self._finish((c, h, w), num_classes)


class LeNet5(_Classifier):
    """LeNet-5 (6 and 16 5x5 conv maps, 120 and 84 hidden units).

    Both convolutions are padded by 2 so that inputs as small as 8x8 work.
    """

    def __init__(self, in_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        c, h, w = _check_shape(in_shape)
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, c, h, w)).shape[1]
        self.features.append(nn.Linear(flat, 120))
        self.features.append(nn.ReLU(inplace=True))
        self.features.append(nn.Linear(120, 84))
        self.features.append(nn.ReLU(inplace=True))
        self._finish((c, h, w), num_classes)


NETWORKS: dict[str, type[_Classifier]] = {"convnet": ConvNet, "mlp": MLP, "lenet": LeNet5}


def make_network(name: str, in_shape: Sequence[int], num_classes: int, **options) -> nn.Module:
    """Build a reference network by name (``convnet``, ``mlp``, ``lenet``)."""
    try:
        cls = NETWORKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; available: {sorted(NETWORKS)}") from None
    return cls(in_shape=in_shape, num_classes=num_classes, **options)
