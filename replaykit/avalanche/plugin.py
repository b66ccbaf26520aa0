"""The replay plugin: a distilled buffer replayed beside each experience's data, with held logits and mixed views."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterator

import torch
from avalanche.evaluation.metric_results import MetricValue
from avalanche.training.plugins import ReplayPlugin
from torch.utils.data import DataLoader, TensorDataset

from ..buffer import SyntheticBuffer
from ..training import soft_cross_entropy
from .options import BufferConfig
from .storage import DistilledBuffer
from .views import mix_view

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate

__all__ = ["DistilledReplayPlugin"]


def _cycle(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


class DistilledReplayPlugin(ReplayPlugin):
    """Replay of a fixed-size distilled buffer beside each experience's data.

    Args:
        mem_size: M, the most images held in total after any experience (default 100 unless ``mem_bytes``).
        mem_bytes: the budget in bytes instead (see :class:`DistilledBuffer`); ``mem_size`` is then what fits.
        method: distillation method name (see :func:`replaykit.distill.available`).
        method_options: options for the method's constructor.
        batch_size: new samples per mini-batch (default: the strategy's ``train_mb_size``).
        batch_size_mem: buffer samples per mini-batch (default: the strategy's ``train_mb_size``).
        soft_loss_weight: weight of the soft-label replay loss (soft-label buffers only).
        logits: hold the learner's logits with every image (see :class:`DistilledBuffer`) and replay them as
            DER does: each step also draws ``batch_size_mem`` buffer images and adds
            ``logit_loss_weight`` times the mean squared error between the model's logits and the held ones.
        logit_loss_weight: that weight (DER's alpha).
        mix: with a lossy buffer (reduced resolution, JPEG), the share of every training mini-batch
            shown as the buffer would give it back (:meth:`DistilledBuffer.view`, see
            :class:`MixedViewPlugin`); 0 turns it off.
        distill_device: where distillation runs (default: the strategy's device; see :class:`DistilledBuffer`).
        storage_policy: a ready :class:`DistilledBuffer` (overrides the options above).
        config: the buffer's options as a :class:`~replaykit.avalanche.options.BufferConfig` instead of keyword
            arguments (``mem_size`` is its ``max_size``; the plugin's own options above stay keywords; not both).
        Other keyword arguments go to :class:`DistilledBuffer`.
    """

    def __init__(
        self,
        mem_size: int | None = None,
        method: str = "dm",
        method_options: dict[str, Any] | None = None,
        *,
        batch_size: int | None = None,
        batch_size_mem: int | None = None,
        recompress: str = "distill",
        storage: str = "float32",
        dataset_meta: dict[str, Any] | None = None,
        num_classes: int | None = None,
        soft_loss_weight: float = 1.0,
        seed: int = 0,
        progress: bool = True,
        storage_policy: DistilledBuffer | None = None,
        mem_bytes: int | None = None,
        learner_aware: bool = False,
        mix: float = 0.5,
        soft_labels: bool = False,
        jpeg_quality: int = 50,
        workers: int | None = None,
        group: Any = None,
        augment: bool = False,
        logits: bool = False,
        logit_loss_weight: float = 0.1,
        core: float | None = None,
        fill: str = "random",
        distill_device: str | torch.device | None = None,
        config: BufferConfig | None = None,
    ) -> None:
        if not (logit_loss_weight >= 0 and math.isfinite(logit_loss_weight)):
            raise ValueError(f"logit_loss_weight must be >= 0, got {logit_loss_weight!r}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must lie in [0, 1], got {mix!r}")
        if storage_policy is None:
            if config is None and mem_size is None and mem_bytes is None:
                mem_size = 100
            storage_policy = DistilledBuffer(
                mem_size, method, method_options, config=config, recompress=recompress, storage=storage, dataset_meta=dataset_meta,
                num_classes=num_classes, seed=seed, progress=progress, mem_bytes=mem_bytes, learner_aware=learner_aware,
                soft_labels=soft_labels, jpeg_quality=jpeg_quality, workers=workers, group=group, augment=augment,
                logits=logits, core=core, fill=fill, distill_device=distill_device,
            )
            mem_size, seed = storage_policy.max_size, storage_policy.seed
        elif config is not None:
            raise ValueError("give storage_policy or config, not both: a ready buffer has its own configuration")
        elif not isinstance(storage_policy, DistilledBuffer):
            raise TypeError(f"storage_policy must be a DistilledBuffer, got {type(storage_policy).__name__}")
        elif mem_size is None:
            mem_size = storage_policy.max_size
        elif storage_policy.max_size != mem_size:
            raise ValueError(f"storage_policy.max_size={storage_policy.max_size} differs from mem_size={mem_size}")
        super().__init__(mem_size=mem_size, batch_size=batch_size, batch_size_mem=batch_size_mem, storage_policy=storage_policy)
        self.soft_loss_weight = soft_loss_weight
        self.seed = seed
        self.mix = float(mix)
        self._mix_gen = torch.Generator().manual_seed(seed * 7_777 + 11)
        self._soft_batches: Iterator | None = None
        self.logit_loss_weight = float(logit_loss_weight)
        self._logit_batches: Iterator | None = None

    @property
    def buffer(self) -> SyntheticBuffer | None:
        """The held :class:`SyntheticBuffer` (``None`` before the first experience)."""
        return self.storage_policy.synthetic

    def before_training_exp(self, strategy: "SupervisedTemplate", num_workers: int = 0, shuffle: bool = True,
                            drop_last: bool = False, **kwargs: Any) -> None:
        exp = strategy.experience
        classes = getattr(exp, "classes_in_this_experience", None)
        if classes is None:
            classes = exp.dataset.targets.uniques
        sample = exp.dataset[0][0] if len(exp.dataset) else None
        self.storage_policy.check_experience(list(classes), tuple(sample.shape) if sample is not None else None)
        synthetic = self.storage_policy.synthetic
        size = self.batch_size_mem or strategy.train_mb_size
        if synthetic is not None and synthetic.logits is not None and len(synthetic):
            gen = torch.Generator().manual_seed(self.seed * 104723 + strategy.clock.train_exp_counter)
            held = TensorDataset(synthetic.decoded_images(), synthetic.logits)
            self._logit_batches = _cycle(DataLoader(held, batch_size=size, shuffle=True, generator=gen))
        if synthetic is not None and synthetic.is_soft and len(synthetic):
            gen = torch.Generator().manual_seed(self.seed * 104729 + strategy.clock.train_exp_counter)
            loader = DataLoader(TensorDataset(synthetic.decoded_images(), synthetic.labels), batch_size=size, shuffle=True, generator=gen)
            self._soft_batches = _cycle(loader)
            return
        super().before_training_exp(strategy, num_workers=num_workers, shuffle=shuffle, drop_last=drop_last, **kwargs)

    def before_forward(self, strategy: "SupervisedTemplate", **kwargs: Any) -> None:
        synthetic = self.storage_policy.synthetic
        if synthetic is not None and len(synthetic):
            mix_view(strategy, self.storage_policy.view, self.mix, self._mix_gen)

    def before_backward(self, strategy: "SupervisedTemplate", **kwargs: Any) -> None:
        if self._logit_batches is not None and self.logit_loss_weight > 0:
            images, held = next(self._logit_batches)
            outputs = strategy.model(images.to(strategy.device))
            strategy.loss += self.logit_loss_weight * torch.nn.functional.mse_loss(outputs, held.to(strategy.device))
        if self._soft_batches is None:
            return
        images, targets = next(self._soft_batches)
        logits = strategy.model(images.to(strategy.device))
        strategy.loss += self.soft_loss_weight * soft_cross_entropy(logits, targets.to(strategy.device))

    def after_training_exp(self, strategy: "SupervisedTemplate", **kwargs: Any) -> None:
        self._soft_batches = self._logit_batches = None  # generators cannot be checkpointed
        self.storage_policy.post_adapt(strategy, strategy.experience)
        seconds = self.storage_policy.distill_seconds[-1]
        exp_id = int(getattr(strategy.experience, "current_experience", len(self.storage_policy.distill_seconds) - 1))
        evaluator = getattr(strategy, "evaluator", None)
        if evaluator is not None:
            name = f"DistillSeconds/train_phase/train_stream/Exp{exp_id:03d}"
            evaluator.publish_metric_value(MetricValue(self, name, seconds, strategy.clock.train_iterations))
            evaluator.publish_metric_value(
                MetricValue(self, "BufferImages/train_phase/train_stream", len(self.storage_policy.synthetic), strategy.clock.train_iterations)
            )
