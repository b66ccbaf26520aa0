"""The replay plugin: a distilled buffer replayed beside each experience's data, with held logits and mixed views."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from avalanche.evaluation.metric_results import MetricValue
from avalanche.training.plugins import ReplayPlugin

from ..buffer import SyntheticBuffer
from .held import LogitReplayPlugin, SoftLabelReplayPlugin
from .options import BufferConfig
from .storage import DistilledBuffer
from .views import MixedViewPlugin

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate

__all__ = ["DistilledReplayPlugin"]


class DistilledReplayPlugin(ReplayPlugin):
    """Replay of a fixed-size distilled buffer beside each experience's data.

    It is Avalanche's ``ReplayPlugin`` over a :class:`DistilledBuffer` with its parts wired in: held logits replayed
    by a :class:`~replaykit.avalanche.held.LogitReplayPlugin`, soft labels by a
    :class:`~replaykit.avalanche.held.SoftLabelReplayPlugin`, and mixed views by a
    :class:`~replaykit.avalanche.views.MixedViewPlugin` (:attr:`logit_replay`, :attr:`soft_replay`,
    :attr:`mixed_view`); each of them also plugs into a strategy on its own.

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
        epochs: the strategy's epochs per experience, which ``method="auto"`` chooses for (a mismatch is refused).
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
        epochs: int = 1,
        distill_device: str | torch.device | None = None,
        config: BufferConfig | None = None,
    ) -> None:
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must lie in [0, 1], got {mix!r}")
        if storage_policy is None:
            if config is None and mem_size is None and mem_bytes is None:
                mem_size = 100
            storage_policy = DistilledBuffer(
                mem_size, method, method_options, config=config, recompress=recompress, storage=storage, dataset_meta=dataset_meta,
                num_classes=num_classes, seed=seed, progress=progress, mem_bytes=mem_bytes, learner_aware=learner_aware,
                soft_labels=soft_labels, jpeg_quality=jpeg_quality, workers=workers, group=group, augment=augment,
                logits=logits, core=core, fill=fill, epochs=epochs, distill_device=distill_device,
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
        self.seed = seed
        try:
            self.logit_replay = LogitReplayPlugin(storage_policy, logit_loss_weight, batch_size_mem, seed)
        except ValueError as exc:
            raise ValueError(f"logit_loss_weight: {exc}") from None
        self.soft_replay = SoftLabelReplayPlugin(storage_policy, soft_loss_weight, batch_size_mem, seed)
        self.mixed_view = MixedViewPlugin(storage_policy.view, mix, seed)

    @property
    def logit_loss_weight(self) -> float:
        """DER's alpha for the held logits (:attr:`logit_replay`'s weight)."""
        return self.logit_replay.weight

    @property
    def soft_loss_weight(self) -> float:
        return self.soft_replay.weight

    @property
    def mix(self) -> float:
        """The share of each training mini-batch shown through the buffer's codec (:attr:`mixed_view`'s ``p``)."""
        return self.mixed_view.p

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "logit_replay" not in state:  # a checkpoint from before the plugin was made of parts
            policy, seed, size = state["storage_policy"], state["seed"], state.get("batch_size_mem")
            state["logit_replay"] = LogitReplayPlugin(policy, state.pop("logit_loss_weight", 0.1), size, seed)
            state["soft_replay"] = SoftLabelReplayPlugin(policy, state.pop("soft_loss_weight", 1.0), size, seed)
            state["mixed_view"] = MixedViewPlugin(policy.view, state.pop("mix", 0.5), seed)
            if "_mix_gen" in state:
                state["mixed_view"]._gen = state.pop("_mix_gen")  # the draws go on where they stopped
            state.pop("_soft_batches", None), state.pop("_logit_batches", None)
        self.__dict__.update(state)

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
        chosen_for = self.storage_policy.resolved.epochs
        if self.storage_policy.memory_choice is not None and getattr(strategy, "train_epochs", chosen_for) != chosen_for:
            raise ValueError(f"method='auto' chose this buffer for epochs={chosen_for} per experience, but the strategy trains "
                             f"{strategy.train_epochs}: give the plugin epochs={strategy.train_epochs}")
        self.logit_replay.before_training_exp(strategy)
        self.soft_replay.before_training_exp(strategy)
        if self.soft_replay.active:
            return  # soft labels replace the plain replay of the held images
        super().before_training_exp(strategy, num_workers=num_workers, shuffle=shuffle, drop_last=drop_last, **kwargs)

    def before_forward(self, strategy: "SupervisedTemplate", **kwargs: Any) -> None:
        synthetic = self.storage_policy.synthetic
        if synthetic is not None and len(synthetic):  # no draw while nothing is held: the same draws as before
            self.mixed_view.before_forward(strategy)

    def before_backward(self, strategy: "SupervisedTemplate", **kwargs: Any) -> None:
        self.logit_replay.before_backward(strategy)
        self.soft_replay.before_backward(strategy)

    def after_training_exp(self, strategy: "SupervisedTemplate", **kwargs: Any) -> None:
        self.logit_replay.after_training_exp(strategy)
        self.soft_replay.after_training_exp(strategy)
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
