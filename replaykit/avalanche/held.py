"""Replay of what a distilled buffer holds beside its images: the learner's logits (DER's term) or soft labels.

Small Avalanche plugins over a :class:`~replaykit.avalanche.storage.DistilledBuffer`; they compose with
Avalanche's own ``ReplayPlugin(storage_policy=buffer)`` and with :class:`~replaykit.avalanche.views.MixedViewPlugin`
(``MixedViewPlugin(buffer.view)``). :class:`~replaykit.avalanche.plugin.DistilledReplayPlugin` is these parts together.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterator

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch.utils.data import DataLoader, TensorDataset

from ..buffer import SyntheticBuffer
from ..training import soft_cross_entropy
from ..typed import check_positive_int

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate

    from .storage import DistilledBuffer

__all__ = ["HeldTargetsPlugin", "LogitReplayPlugin", "SoftLabelReplayPlugin"]


def _cycle(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


class HeldTargetsPlugin(SupervisedPlugin):
    """Each training step draws ``batch_size`` held images (default: the strategy's ``train_mb_size``) with their
    held targets and adds ``weight * loss(model(images), targets)`` to the strategy's loss before the backward pass.

    The draw order is fixed by ``seed`` and the experience counter, so a run is repeatable."""

    #: Multiplies ``seed`` for the loader's generator (one stream per kind of target).
    seed_stride = 1

    def __init__(self, storage_policy: "DistilledBuffer", weight: float, batch_size: int | None = None, seed: int = 0) -> None:
        super().__init__()
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"weight must be >= 0 and finite, got {weight!r}")
        check_positive_int("batch_size", batch_size, allow_none=True)
        self.storage_policy = storage_policy
        self.weight = float(weight)
        self.batch_size = batch_size
        self.seed = seed
        self._batches: Iterator | None = None

    @property
    def active(self) -> bool:
        """Whether this experience's steps replay held targets (set by :meth:`before_training_exp`)."""
        return self._batches is not None

    def targets(self, held: SyntheticBuffer) -> torch.Tensor | None:
        """The held targets to replay, one row per held image (``None``: this buffer holds none)."""
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def before_training_exp(self, strategy: "SupervisedTemplate", **kwargs: Any) -> None:
        held = self.storage_policy.synthetic
        targets = self.targets(held) if held is not None and len(held) else None
        if targets is None:
            self._batches = None
            return
        gen = torch.Generator().manual_seed(self.seed * self.seed_stride + strategy.clock.train_exp_counter)
        loader = DataLoader(TensorDataset(held.decoded_images(), targets), batch_size=self.batch_size or strategy.train_mb_size,
                            shuffle=True, generator=gen)
        self._batches = _cycle(loader)

    def before_backward(self, strategy: "SupervisedTemplate", **kwargs: Any) -> None:
        if self._batches is None or self.weight == 0:
            return
        images, targets = next(self._batches)
        outputs = strategy.model(images.to(strategy.device))
        strategy.loss += self.weight * self.loss(outputs, targets.to(strategy.device))

    def after_training_exp(self, strategy: "SupervisedTemplate", **kwargs: Any) -> None:
        self._batches = None  # a generator cannot be checkpointed


class LogitReplayPlugin(HeldTargetsPlugin):
    """DER's logit term over the logits a buffer holds (``DistilledBuffer(logits=True)``): ``weight`` (DER's alpha)
    times the mean squared error between the model's logits and the held ones."""

    seed_stride = 104_723

    def __init__(self, storage_policy: "DistilledBuffer", weight: float = 0.1, batch_size: int | None = None, seed: int = 0) -> None:
        super().__init__(storage_policy, weight, batch_size, seed)

    def targets(self, held: SyntheticBuffer) -> torch.Tensor | None:
        return held.logits

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(outputs, targets)


class SoftLabelReplayPlugin(HeldTargetsPlugin):
    """Replay of a soft-label buffer (``DistilledBuffer(soft_labels=True)``, or a method that learns labels):
    ``weight`` times the soft cross-entropy between the model's outputs and the held label distributions.
    It replaces the plain replay of those images (which would read one hard label off each row)."""

    seed_stride = 104_729

    def __init__(self, storage_policy: "DistilledBuffer", weight: float = 1.0, batch_size: int | None = None, seed: int = 0) -> None:
        super().__init__(storage_policy, weight, batch_size, seed)

    def targets(self, held: SyntheticBuffer) -> torch.Tensor | None:
        return held.labels if held.is_soft else None

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(outputs, targets)
