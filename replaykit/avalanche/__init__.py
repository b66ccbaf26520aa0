"""Distilled replay for Avalanche 0.6: a storage policy and the plugin that drives it.

Add one plugin to the strategy you already have::

    from replaykit.avalanche import DistilledReplayPlugin
    plugin = DistilledReplayPlugin(mem_size=100, method="dm", dataset_meta=dataset_info("mnist").meta())
    strategy = Naive(model, optimizer, plugins=[plugin, LwFPlugin()], train_mb_size=128)

The buffer's options may be one typed, JSON-serialisable object instead (same checks, same buffer)::

    config = BufferConfig(max_size=100, method="dm", method_options={"iterations": 300})
    plugin = DistilledReplayPlugin(config=config, dataset_meta=dataset_info("mnist").meta())

:class:`DistilledBuffer` is an Avalanche ``ExemplarsBuffer``: after each experience
it distills that experience's data class by class with a method from
:mod:`replaykit.distill` and keeps at most ``max_size`` images in total. When new
classes arrive every class's quota shrinks to ``max_size // classes_seen`` (the
remainder goes to the lowest class ids) and the classes already held are
re-compressed: the held synthetic set of a class is distilled further with the
same method (``recompress="distill"``) or a seeded random part of it is kept
(``recompress="select"``). Because it is an ``ExemplarsBuffer`` it also works as
``ReplayPlugin(storage_policy=DistilledBuffer(...))``.

Well-defined edge cases:

* a class with fewer real images than its quota keeps all of them (the method is
  asked for exactly that many), so the buffer may hold fewer than ``max_size``;
* a budget smaller than the number of classes seen raises ``ValueError`` before
  training on the experience that would break it;
* an experience with new data for a class already held: the new data is distilled
  at the class's quota, joined to the held images and re-compressed to the quota,
  so old and new data weigh the same;
* a buffer (loaded or passed in) whose image shape or dataset differs from the
  stream's raises ``ValueError`` naming both.

:class:`DistilledReplayPlugin` replays with Avalanche's ``ReplayDataLoader``
(``batch_size`` new + ``batch_size_mem`` buffer samples per mini-batch). Buffers
with soft labels cannot share a collated target tensor with the hard labels of
the new data, so for them the plugin draws a buffer batch itself (as Avalanche's
DER does) and adds the soft-label cross-entropy to the strategy's loss before the
backward pass. Distillation seconds per experience are published through
``strategy.evaluator`` as ``DistillSeconds/train_phase/train_stream/ExpNNN`` so
every Avalanche logger sees them. Checkpointing with Avalanche's
``save_checkpoint`` / ``maybe_load_checkpoint`` restores the buffer; on its own the
buffer is written with :meth:`DistilledBuffer.save` in ReplayKit's safetensors format.

Modules: :mod:`~replaykit.avalanche.budget` (bytes per image, images per budget, class quotas),
:mod:`~replaykit.avalanche.options` (:class:`BufferConfig`, the storage policy's configuration),
:mod:`~replaykit.avalanche.storage` (:class:`DistilledBuffer`), :mod:`~replaykit.avalanche.plugin`
(:class:`DistilledReplayPlugin`), :mod:`~replaykit.avalanche.held` (replay of held logits and soft labels),
:mod:`~replaykit.avalanche.views` (mixed-view training) and
:mod:`~replaykit.avalanche.datasets` (Avalanche datasets <-> tensors). How images are stored is
:mod:`replaykit.codecs`.
"""

from __future__ import annotations

# noqa: F401 below: names re-exported from where they used to live (replaykit/avalanche.py)
from .. import checkpointing as _checkpointing  # noqa: F401 - dill pickles torch optimizers: whole-strategy checkpoints
from ..device import resolve_device  # noqa: F401  (looked up here by the storage policy: one place to swap it)
from .budget import class_quotas, image_cost_bytes, images_for_bytes
from .distilling import DistillationError
from .held import HeldTargetsPlugin, LogitReplayPlugin, SoftLabelReplayPlugin
from .datasets import _LabelledImages, dataset_tensors, replay_transform  # noqa: F401
from .options import BufferConfig
from .plugin import DistilledReplayPlugin
from .storage import RECOMPRESS_MODES, DistilledBuffer  # noqa: F401
from .views import MixedResolutionPlugin, MixedViewPlugin, low_resolution_view, mix_view  # noqa: F401

__all__ = ["BufferConfig", "DistilledBuffer", "DistilledReplayPlugin", "DistillationError", "HeldTargetsPlugin", "LogitReplayPlugin",
           "SoftLabelReplayPlugin", "MixedResolutionPlugin", "MixedViewPlugin", "low_resolution_view",
           "dataset_tensors", "class_quotas", "image_cost_bytes", "images_for_bytes"]
