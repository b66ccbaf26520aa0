"""Feature extractors shared by the distillers (DM, DM-multi, herding, k-center, KRR).

Several methods look at images through a network rather than in pixel space:
distribution matching compares mean embeddings under *randomly initialised*
ConvNets, the selection baselines pick images in an embedding space, and kernel
methods build kernels from random features. This module holds those pieces
once:

* :class:`RandomConvNets` — a reusable ConvNet whose weights are re-drawn from a
  seed on demand (cheaper than building a new module every iteration, and
  reproducible: the same seed gives the same network).
* :func:`embed` — batched, gradient-free embeddings.
* :func:`trained_embedding_net` — a ConvNet briefly trained on the data, whose
  embedding is a class-aware feature space for the selection baselines.
* :func:`class_index` / :func:`real_init` — per-class indices and the
  "initialise the synthetic set from real images" step.
* :class:`FeatureSelection` — the base of the selection baselines (herding, k-center).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from ..networks import ConvNet
from ..training import seeded, train_classifier
from .base import DistillResult, Distiller

__all__ = [
    "RandomConvNets", "embed", "trained_embedding_net", "selection_features", "FeatureSelection",
    "class_index", "real_init", "starting_images", "derive_seed",
]


def derive_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (seed, class, iteration...).

    Lets a method give every class / iteration its own random stream, so that the
    result for one class does not depend on which other classes were distilled
    alongside it.
    """
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class _GradFreeFastPool(nn.AvgPool2d):
    """2x2 average pooling that sums four strided views when no gradient flows through it.

    On CPU, ``avg_pool2d``'s NCHW kernel was about half of a gradient-free ConvNet
    forward; the strided sum gives the same values up to float rounding, and DM's
    real-batch forward (the bulk of an iteration) is gradient-free. With a gradient
    the plain kernel runs (its backward is the faster one).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        return (x[..., 0:h:2, 0:w:2] + x[..., 1:h:2, 0:w:2] + x[..., 0:h:2, 1:w:2] + x[..., 1:h:2, 1:w:2]) * 0.25


class RandomConvNets:
    """Randomly initialised ConvNet-D feature extractors, re-drawn by seed.

    Holds one :class:`~replaykit.networks.ConvNet` and re-initialises its weights in
    place for every :meth:`sample` (PyTorch's default initialisation, as in the DM
    reference code). Parameters never require gradients: the networks are fixed
    probes, only the images they look at are learned. Its 2x2 pools are
    :class:`_GradFreeFastPool` (measured: dm at IPC 10 on MNIST, 1 thread, 3.27 -> 4.21
    iterations/s).

    Args:
        in_shape: ``(C, H, W)`` of the images.
        width, depth, norm: ConvNet options (see :class:`ConvNet`).
        device: where the returned network lives. Weights are always drawn on the CPU (from the
            seeded CPU generator) and copied there, so one seed gives the same network on every device.
    """

    def __init__(self, in_shape: Sequence[int], *, width: int = 128, depth: int = 3, norm: str = "instance",
                 device: str | torch.device = "cpu") -> None:
        self.net = ConvNet(in_shape, num_classes=1, width=width, depth=depth, norm=norm)
        for block in self.net.features[:-1]:
            for i, layer in enumerate(block):
                if type(layer) is nn.AvgPool2d and layer.kernel_size == 2 and layer.stride == 2 and not layer.padding:
                    block[i] = _GradFreeFastPool(2)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()
        self.embedding_dim = self.net.embedding_dim
        self._host = self.net  # where weights are drawn
        if torch.device(device).type != "cpu":
            self.net = copy.deepcopy(self._host).to(device)

    def sample(self, seed: int) -> ConvNet:
        """Re-draw every weight from ``seed``; return the (shared) network."""
        with seeded(seed), torch.no_grad():
            for module in self._host.modules():
                if module is not self._host and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            if self.net is not self._host:  # host-to-device copies that do not wait for the GPU's queued work
                for target, source in zip(self.net.parameters(), self._host.parameters()):
                    target.copy_(source, non_blocking=True)
        return self.net


@torch.no_grad()
def embed(net: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``net.embed(images)`` in eval mode, in batches, without building a graph."""
    was_training = net.training
    net.eval()
    out = torch.cat([net.embed(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)])
    net.train(was_training)
    return out


def trained_embedding_net(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 3,
    width: int = 32,
    depth: int = 3,
    max_images: int = 20000,
    seed: int = 0,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> ConvNet:
    """A ConvNet briefly trained on ``(images, labels)``; its embedding separates the classes.

    The selection baselines (herding, k-center) need a feature space in which
    distances mean "looks like the same kind of example"; a random network gives
    mostly low-level similarity, a few epochs of training give class-aware
    features (this is what iCaRL's herding uses). At most ``max_images`` (a seeded
    random subset) are used, to keep the cost bounded on CPU.
    """
    with seeded(seed):
        net = ConvNet(images.shape[1:], num_classes=num_classes, width=width, depth=depth).to(device)
    if images.shape[0] > max_images:
        keep = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:max_images]
        images, labels = images[keep], labels[keep]
    train_classifier(net, images, labels, epochs=epochs, batch_size=128, lr=0.01, seed=seed, progress=progress, desc="feature net")
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def class_index(labels: torch.Tensor, cls: int) -> torch.Tensor:
    """Indices of the images of class ``cls``."""
    return torch.nonzero(labels == cls).flatten()


def real_init(images: torch.Tensor, index: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct real images drawn (seeded) from ``images[index]``, cloned.

    Distillation methods start from real images by default: it converges faster
    and to better sets than noise.
    """
    return images[real_pick(index, count, seed)].clone()


def real_pick(index: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """The indices :func:`real_init` takes: ``count`` distinct entries of ``index`` in a seeded random order."""
    return index[torch.randperm(index.numel(), generator=torch.Generator().manual_seed(seed))[:count]]


def starting_images(images: torch.Tensor, labels: torch.Tensor, classes: list[int], ipc: int, init: str, seed: int) -> torch.Tensor:
    """The learnable synthetic set, class by class in ``classes`` order: ``ipc`` real images
    (``init="real"``) or standard-normal noise (``"noise"``) per class, seeded per class so a
    class starts the same whichever other classes are distilled beside it."""
    parts = []
    for c in classes:
        if init == "real":
            parts.append(real_init(images, class_index(labels, c), ipc, derive_seed(seed, c)))
        else:
            noise = torch.randn((ipc, *images.shape[1:]), generator=torch.Generator().manual_seed(derive_seed(seed, c)))
            parts.append(noise.to(images.device))  # drawn on the host: the same start on every device
    return torch.cat(parts).requires_grad_(True)


def selection_features(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    feature: str = "trained",
    width: int = 32,
    epochs: int = 2,
    seed: int = 0,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """L2-normalised embeddings ``[N, D]`` in which the selection baselines pick images.

    ``feature="trained"`` (default): a ConvNet trained for a few ``epochs`` on the
    data, so that nearness means similar class-relevant content (iCaRL's choice
    for herding). ``"random"``: a randomly initialised ConvNet: no training cost,
    but mostly low-level similarity.
    ``device`` (default: the images' device) is where the network trains and embeds.
    """
    device = images.device if device is None else device
    if feature == "trained":
        net = trained_embedding_net(images, labels, num_classes, epochs=epochs, width=width, seed=seed, progress=progress,
                                    device=device)
    elif feature == "random":
        net = RandomConvNets(images.shape[1:], width=width, device=device).sample(seed)
    else:
        raise ValueError(f"feature must be 'trained' or 'random', got {feature!r}")
    return torch.nn.functional.normalize(embed(net, images), dim=1)


class FeatureSelection(Distiller):
    """Selection baselines: order each class's real images in a feature space, keep the first ``ipc``.

    Subclasses only say how to order (:meth:`order`). Args: ``feature`` ("trained" |
    "random"), ``feature_width``, ``feature_epochs`` (see :func:`selection_features`).
    """

    selects = True

    def __init__(self, ipc: int = 10, *, feature: str = "trained", feature_width: int = 32, feature_epochs: int = 2,
                 seed: int = 0, progress: bool = True, device: str | torch.device | None = "cpu") -> None:
        super().__init__(ipc, seed=seed, progress=progress, device=device)
        if feature not in ("trained", "random"):
            raise ValueError(f"feature must be 'trained' or 'random', got {feature!r}")
        if feature_width < 1 or feature_epochs < 0:
            raise ValueError(f"feature_width must be >= 1 and feature_epochs >= 0, got {feature_width}, {feature_epochs}")
        self.feature, self.feature_width, self.feature_epochs = feature, feature_width, feature_epochs

    @staticmethod
    def order(features: torch.Tensor, count: int) -> torch.Tensor:
        """Indices of ``count`` distinct rows of ``features`` (one class), in the order chosen."""
        raise NotImplementedError

    def _distill(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int], num_classes: int) -> DistillResult:
        feats = selection_features(images, labels, num_classes, feature=self.feature, width=self.feature_width,
                                   epochs=self.feature_epochs, seed=self.seed, progress=self.progress).cpu()
        picked = []  # the greedy orderings run on the host (small, step by step)
        for c in classes:
            idx = class_index(labels, c)
            picked.append(idx[self.order(feats[idx], self.ipc)])
        index = torch.cat(picked)
        return DistillResult(images[index].clone(), labels[index].clone(), labels[index].clone(), {"feature": self.feature})
