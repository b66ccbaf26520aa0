"""Distilled replay for Avalanche 0.6: a storage policy and the plugin that drives it.

Add one plugin to the strategy you already have::

    from replaykit.avalanche import DistilledReplayPlugin
    plugin = DistilledReplayPlugin(mem_size=100, method="dm", dataset_meta=dataset_info("mnist").meta())
    strategy = Naive(model, optimizer, plugins=[plugin, LwFPlugin()], train_mb_size=128)

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
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_classification_dataset
from avalanche.evaluation.metric_results import MetricValue
from avalanche.training.plugins import ReplayPlugin, SupervisedPlugin
from avalanche.training.storage_policy import ExemplarsBuffer
from torch.utils.data import DataLoader, TensorDataset

from . import distill as _distill
from .buffer import STORAGE_DTYPES, SyntheticBuffer, decode_upsample, logit_row_bytes
from .device import module_device, resolve_device
from .distill.dm import MatchingDistiller
from .progress import progress_bar
from .training import soft_cross_entropy

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate

__all__ = ["DistilledBuffer", "DistilledReplayPlugin", "MixedResolutionPlugin", "MixedViewPlugin", "low_resolution_view", "dataset_tensors", "class_quotas", "image_cost_bytes", "images_for_bytes"]

RECOMPRESS_MODES = ("distill", "select", "prefix")


def image_cost_bytes(in_shape: Sequence[int], *, factor: int = 1, storage: str = "uint8", bits: int = 8,
                     soft_classes: int = 0, logit_classes: int = 0) -> int:
    """Bytes one held image costs: its pixels at the stored resolution and precision plus a one-byte label.

    ``bits`` (uint8 storage only): grey levels of ``bits`` bits, packed ``8 // bits`` to a byte.
    ``soft_classes``: a float16 soft-label row over that many classes is held too.
    ``logit_classes``: the learner's logits over that many classes are held too (int8 each + a float16 scale).
    """
    from . import codecs

    return codecs.image_cost_bytes(in_shape, factor=factor, storage=storage, bits=bits, soft_classes=soft_classes,
                                   logit_classes=logit_classes)


def images_for_bytes(mem_bytes: int, in_shape: Sequence[int], *, factor: int = 1, storage: str = "uint8", bits: int = 8,
                     soft_classes: int = 0, logit_classes: int = 0) -> int:
    """How many images fit in ``mem_bytes`` (pixels + labels): 78,500 B hold 100 uint8 MNIST images, 398 at 2 bits."""
    if not isinstance(mem_bytes, int) or isinstance(mem_bytes, bool) or mem_bytes < 1:
        raise ValueError(f"mem_bytes must be a positive int, got {mem_bytes!r}")
    return mem_bytes // image_cost_bytes(in_shape, factor=factor, storage=storage, bits=bits, soft_classes=soft_classes,
                                         logit_classes=logit_classes)


def class_quotas(classes: Sequence[int], mem_size: int) -> dict[int, int]:
    """Split ``mem_size`` images over ``classes``: equal shares, remainder to the lowest ids."""
    classes = sorted(set(int(c) for c in classes))
    if not classes:
        return {}
    if mem_size < len(classes):
        raise ValueError(
            f"memory budget of {mem_size} images is smaller than the {len(classes)} classes seen so far "
            f"({classes}); every class needs at least one image: raise mem_size to >= {len(classes)}"
        )
    base, extra = divmod(mem_size, len(classes))
    return {c: base + (1 if i < extra else 0) for i, c in enumerate(classes)}


def dataset_tensors(dataset: AvalancheDataset, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of an Avalanche classification dataset, with its eval transforms."""
    data = dataset.eval() if hasattr(dataset, "eval") else dataset
    collate = getattr(data, "collate_fn", None)
    xs, ys = [], []
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate):
        xs.append(torch.as_tensor(batch[0]).float())
        ys.append(torch.as_tensor(batch[1]).long().reshape(-1))
    if not xs:
        raise ValueError("the experience has no training data to distill")
    return torch.cat(xs), torch.cat(ys)


class _LabelledImages(TensorDataset):
    """Tensor dataset with the ``targets`` list Avalanche's classification datasets need;
    ``transform`` (e.g. :class:`replaykit.augment.ReplayAugment`) is applied to each image as it is drawn."""

    def __init__(self, images: torch.Tensor, class_ids: torch.Tensor, transform: Any = None) -> None:
        super().__init__(images, class_ids)
        self.targets = [int(c) for c in class_ids]
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = super().__getitem__(index)
        return (image if self.transform is None else self.transform(image)), target


def replay_transform(augment: bool, dataset: str | None, seed: int) -> Any:
    """The per-image transform of replayed samples: DSA's for the dataset when ``augment``, else none."""
    if not augment:
        return None
    from .augment import ReplayAugment

    return ReplayAugment(dataset, seed=seed)


class DistilledBuffer(ExemplarsBuffer):
    """Avalanche storage policy holding a fixed-size buffer of distilled images.

    Args:
        max_size: M, the most images held in total.
        method: a name from :func:`replaykit.distill.available` (``dm`` is the default), or ``"auto"``: distill,
            hybrid or select by the bytes each class gets, from the measured table in :mod:`replaykit.memory_choice`
            (needs ``mem_bytes`` and ``num_classes``; the table sets the storage, JPEG quality and held logits too; the
            choice is logged and kept in the buffer's ``memory_choice``).
        method_options: keyword options for the method's constructor (not ``ipc`` / ``seed``).
        recompress: when a held class's quota shrinks: ``"distill"`` (distill its synthetic set further),
            ``"select"`` (keep a seeded random part of it) or ``"prefix"`` (keep its first images: the
            ones a selecting method picked first, e.g. herding's greedy order, or the distilled ``core``).
        storage: ``"float32"``, ``"float16"`` or ``"uint8"``: the held images are rounded to
            this precision after every update, so what is replayed is exactly what
            :meth:`save` writes and :meth:`nbytes` counts (``uint8`` needs the dataset's
            mean / std in ``dataset_meta``).
        dataset_meta: the stream's dataset metadata (``dataset_info(name).meta()``):
            carried into the buffer and checked against loaded buffers.
        num_classes: size of the label space; default grows with the largest class seen.
        seed: every distillation call derives its seed from it.
        progress: show progress bars while distilling.
        mem_bytes: the budget in bytes instead of images (pixels at their stored resolution and
            precision plus one byte per label); ``max_size`` becomes the number of images that fit
            (needs ``dataset_meta['in_shape']``). With ``method_options={"factor": 2}`` the images
            are held at half resolution, so 78,500 bytes hold 398 MNIST images instead of 100.
        learner_aware: give the method the learner (the strategy's model at the end of the
            experience) as an extra feature extractor (``learner=``; matching methods only).
        augment: replay every held image through DSA's random transforms for the dataset
            (:class:`replaykit.augment.ReplayAugment`): the images were distilled under them, and
            a buffer of a few hundred images replayed tens of times per experience is memorised.
        workers: distill each experience's new classes on this many local processes
            (:mod:`replaykit.distributed`, bit-identical to one process); ``group``: a
            ``torch.distributed`` process group to shard them over instead (every rank runs the
            strategy; rank 0 gathers and sends every rank the same buffer).
        soft_labels: label each new synthetic image with the learner's softened prediction
            (``softmax(logits / soft_temperature)``, DER-style dark knowledge), held as float16 and
            counted in the bytes; replayed with a soft cross-entropy. Needs ``num_classes``.
        logits: hold the learner's logits for each new image as it is stored (int8 per class + a float16
            scale, counted in the bytes), computed at the end of the experience that brought its class;
            :class:`DistilledReplayPlugin` replays them DER-style (an extra MSE term on a buffer batch),
            beside the hard labels. Needs ``num_classes``, and ``recompress="select"`` or ``"prefix"`` (or a
            selecting method): a held image that is distilled again has no logits of its learner any more.
        core: distill only for the class's *final* quota, the share it keeps once all ``num_classes``
            classes are held: ``core`` (in (0, 1]) of ``max_size // num_classes`` images per class are
            distilled with ``method`` and stored first; the rest of the class's current quota is filled with
            seeded random real images, which ``recompress="prefix"`` drops first as classes arrive. Without
            it a class is distilled at the quota of the experience that brings it (e.g. 5x the final one
            after the first of five experiences) and later thinned at random, so the images that survive
            were distilled for a much larger set. ``core=1`` ends with only distilled images, below 1 is a
            hybrid memory of distilled and real images in the same bytes. Needs ``num_classes`` and
            ``recompress="prefix"``.
        distill_device: where distillation runs. ``None`` (default): the strategy's device
            (``strategy.device``) when Avalanche calls :meth:`post_adapt`, the CPU for direct
            :meth:`update_from_tensors` calls. The held images always stay on the host (they are the
            memory that is counted); the learner may live on any device.
    """

    def __init__(
        self,
        max_size: int | None = None,
        method: str = "dm",
        method_options: dict[str, Any] | None = None,
        *,
        recompress: str = "distill",
        storage: str = "float32",
        dataset_meta: dict[str, Any] | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        progress: bool = True,
        mem_bytes: int | None = None,
        learner_aware: bool = False,
        soft_labels: bool = False,
        soft_temperature: float = 2.0,
        jpeg_quality: int = 50,
        workers: int | None = None,
        group: Any = None,
        augment: bool = False,
        logits: bool = False,
        core: float | None = None,
        distill_device: str | torch.device | None = None,
    ) -> None:
        choice = None
        if method == "auto":  # distill, hybrid or select, from the measured table in replaykit.memory_choice
            if mem_bytes is None or not num_classes:
                raise ValueError("method='auto' chooses by the bytes each class gets: it needs mem_bytes and num_classes")
            if method_options or core is not None:
                raise ValueError("method='auto' sets the method's options and core itself: leave method_options and core unset")
            from .memory_choice import choose_memory

            choice = choose_memory(mem_bytes / num_classes)
            method, method_options, core, recompress = choice.method, dict(choice.method_options), choice.core, choice.recompress
            storage, jpeg_quality, logits = choice.storage, choice.jpeg_quality, choice.logits
        if core is not None:
            if not (isinstance(core, (int, float)) and not isinstance(core, bool) and 0 < core <= 1):
                raise ValueError(f"core must be a share in (0, 1], got {core!r}")
            if not num_classes:
                raise ValueError("core needs num_classes: the final quota is max_size // num_classes")
            if recompress != "prefix":
                raise ValueError(f"core needs recompress='prefix' (the real fill is dropped before the distilled core), got {recompress!r}")
        if logits and not num_classes:
            raise ValueError("logits needs num_classes (the size of the learner's output)")
        if logits and recompress == "distill" and not getattr(_distill.REGISTRY.get(method), "selects", False):
            raise ValueError("logits needs recompress='select' or 'prefix' (or a selecting method): an image distilled again has no logits of its learner")
        if (workers not in (None, 1) or group is not None) and learner_aware:
            raise ValueError("learner_aware distillation runs in this process: it cannot be combined with workers or group")
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        if storage == "jpeg" and mem_bytes is None:
            raise ValueError("storage='jpeg' needs a budget in bytes (mem_bytes): JPEG images have no fixed size")
        if not (isinstance(jpeg_quality, int) and 1 <= jpeg_quality <= 100):
            raise ValueError(f"jpeg_quality must be an int in [1, 100], got {jpeg_quality!r}")
        if soft_labels and not num_classes:
            raise ValueError("soft_labels needs num_classes (the size of the learner's output)")
        if not soft_temperature > 0:
            raise ValueError(f"soft_temperature must be > 0, got {soft_temperature!r}")
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"storage must be one of {STORAGE_DTYPES}, got {storage!r}")
        factor = int((method_options or {}).get("factor", 1))
        bits = int((method_options or {}).get("bits", 8))
        if bits != 8 and storage != "uint8":
            raise ValueError(f"bits={bits} needs storage='uint8'")
        if storage == "jpeg":
            if max_size is not None:
                raise ValueError("give mem_bytes, not max_size, with storage='jpeg'")
            max_size = 1  # set from the first experience's JPEG sizes (see _fit_jpeg_budget)
        elif mem_bytes is not None:
            in_shape = (dataset_meta or {}).get("in_shape")
            if not in_shape:
                raise ValueError("mem_bytes needs dataset_meta with the images' in_shape (dataset_info(name).meta())")
            fitting = images_for_bytes(mem_bytes, in_shape, factor=factor, storage=storage, bits=bits,
                                       soft_classes=num_classes if soft_labels else 0, logit_classes=num_classes if logits else 0)
            if max_size is not None and max_size != fitting:
                raise ValueError(f"give max_size or mem_bytes, not both: {mem_bytes} bytes hold {fitting} images, not {max_size}")
            if fitting < 1:
                raise ValueError(f"mem_bytes={mem_bytes} holds no image of shape {tuple(in_shape)} at {storage}")
            max_size = fitting
        if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 1:
            raise ValueError(f"max_size must be a positive int (or give mem_bytes), got {max_size!r}")
        if learner_aware and not issubclass(_distill.REGISTRY.get(method, object), MatchingDistiller):
            raise ValueError(f"learner_aware needs a matching method (dm, dm-multi), not {method!r}")
        if method not in _distill.REGISTRY:
            raise ValueError(f"unknown distillation method {method!r}; available: {', '.join(_distill.available())}")
        options = dict(method_options or {})
        clash = {"ipc", "seed", "progress", "learner", "device"} & options.keys()
        if clash:
            raise ValueError(f"method_options must not set {sorted(clash)}: the buffer chooses them (device: distill_device=)")
        if distill_device is not None:
            distill_device = str(resolve_device(distill_device))
        if recompress not in RECOMPRESS_MODES:
            raise ValueError(f"recompress must be one of {RECOMPRESS_MODES}, got {recompress!r}")
        if storage in ("uint8", "jpeg") and not {"mean", "std"} <= set(dataset_meta or {}):
            raise ValueError(f"storage={storage!r} needs dataset_meta with the dataset's mean and std (dataset_info(name).meta())")
        super().__init__(max_size)
        self.method = method
        self.storage = storage
        self.method_options = options
        self.recompress = recompress
        self.dataset_meta = dict(dataset_meta or {})
        self.num_classes = num_classes
        self.seed = seed
        self.progress = progress
        self.mem_bytes = mem_bytes
        self.learner_aware = learner_aware
        self.soft_labels = soft_labels
        self.soft_temperature = float(soft_temperature)
        self.jpeg_quality = jpeg_quality
        self.workers = workers
        self.group = group
        self.augment = bool(augment)
        self.logits = bool(logits)
        self.core = None if core is None else float(core)
        self.memory_choice = None if choice is None else choice.to_json()
        self.distill_device = distill_device
        self._work_device: str | None = None  # the strategy's device, set by post_adapt
        self._learner: torch.nn.Module | None = None
        self.synthetic: SyntheticBuffer | None = None
        self.distill_seconds: list[float] = []
        self._updates = 0
        self._dataset_cache: AvalancheDataset | None = None

    # ----------------------------------------------------------- Avalanche API
    @property
    def buffer(self) -> AvalancheDataset:
        """The held images as an Avalanche classification dataset (task label 0)."""
        if self.synthetic is None or len(self.synthetic) == 0:
            return AvalancheDataset([])
        if self._dataset_cache is None:
            transform = replay_transform(self.augment, self.dataset_meta.get("dataset"), self.seed * 4_099 + self._updates)
            base = _LabelledImages(self.synthetic.decoded_images(), self.synthetic.class_ids, transform)
            self._dataset_cache = _make_taskaware_classification_dataset(base, task_labels=0)
        return self._dataset_cache

    @buffer.setter
    def buffer(self, new_buffer: AvalancheDataset) -> None:
        # ExemplarsBuffer.__init__ assigns an empty dataset; the synthetic buffer is the state.
        self._dataset_cache = None

    def post_adapt(self, agent_state: Any, exp: Any) -> None:
        """Distill the experience's training data into the buffer (Avalanche calls this after training)."""
        images, labels = dataset_tensors(exp.dataset)
        learner = getattr(agent_state, "model", None) if self.learner_aware or self.soft_labels or self.logits else None
        strategy_device = getattr(agent_state, "device", None)
        self._work_device = None if strategy_device is None else str(resolve_device(strategy_device))
        try:
            self.update_from_tensors(images, labels, learner=learner)
        finally:
            self._work_device = None

    def resize(self, strategy: Any, new_size: int) -> None:
        """Change M; held classes are re-compressed when it shrinks."""
        if not isinstance(new_size, int) or new_size < 1:
            raise ValueError(f"new_size must be a positive int, got {new_size!r}")
        self.max_size = new_size
        if self.synthetic is not None and len(self.synthetic):
            quotas = class_quotas(self.synthetic.classes, new_size)
            self._set(self._recompress(self.synthetic, quotas, desc="resize").quantized(self.storage))

    # ----------------------------------------------------------- ReplayKit API
    def check_experience(self, classes: Sequence[int], image_shape: Sequence[int] | None = None) -> None:
        """Raise ``ValueError`` if adding ``classes`` (of ``image_shape``) would break the budget or the buffer."""
        seen = set(self.synthetic.classes if self.synthetic is not None else []) | {int(c) for c in classes}
        if not (self.storage == "jpeg" and self.synthetic is None):  # jpeg: the image budget is known after the first experience
            class_quotas(seen, self.max_size)
        if image_shape is not None and self.synthetic is not None and len(self.synthetic):
            if tuple(image_shape) != self.synthetic.decoded_shape:
                raise ValueError(
                    f"the stream's images have shape {tuple(image_shape)} but the buffer holds images of shape "
                    f"{self.synthetic.decoded_shape} (dataset {self.synthetic.meta.get('dataset')!r}); "
                    "a buffer from another dataset cannot be replayed here"
                )

    def update_from_tensors(self, images: torch.Tensor, labels: torch.Tensor, learner: torch.nn.Module | None = None) -> float:
        """Distill ``(images, labels)`` class by class into the buffer; return the seconds it took.

        ``learner`` (with ``learner_aware``): the network trained on this data, used by the method as a feature extractor.
        """
        _distill.check_training_data(images, labels, None)
        if self.logits and learner is None:
            raise ValueError("this buffer holds the learner's logits (logits=True): pass the learner that was trained on the data")
        self._learner = learner
        if self.storage == "jpeg" and self.synthetic is None:
            self._fit_jpeg_budget(images)
        self.check_experience(torch.unique(labels).tolist(), tuple(images.shape[1:]))
        start = time.perf_counter()
        held = self.synthetic
        new_classes = sorted(int(c) for c in torch.unique(labels))
        k = max([self.num_classes or 0, max(new_classes) + 1] + ([held.num_classes] if held is not None else []))
        quotas = class_quotas(set(new_classes) | set(held.classes if held is not None else []), self.max_size)
        parts: list[SyntheticBuffer] = []
        exp_tag = f"exp {self._updates}"
        bar = progress_bar(new_classes, enabled=self.progress, desc=f"distill {exp_tag} ({self.method})", leave=False)
        distilled = self._distill_new_classes(images, labels, new_classes, quotas, k)
        for cls in bar:
            bar.set_postfix(cls=cls, ipc=quotas[cls])
            fresh = distilled[cls]
            self._check_budget(fresh)
            if self.soft_labels and learner is not None:
                fresh = self._learner_labels(fresh, learner, k)
            if self.logits:
                fresh = fresh.with_logits(self._learner_outputs(fresh, learner, k))
            if held is not None and cls in held.classes:  # new data for a class already held
                joined = SyntheticBuffer.concat([_pad(held.select_classes([cls]), k), fresh])
                fresh = self._recompress(joined, {cls: quotas[cls]}, desc=f"{exp_tag} merge")
            parts.append(fresh)
        if held is not None:
            old = [c for c in held.classes if c not in new_classes]
            if old:
                kept = self._recompress(_pad(held.select_classes(old), k), {c: quotas[c] for c in old}, desc=exp_tag)
                parts.insert(0, kept)
        self._learner = None  # never held between experiences (checkpoints stay small)
        seconds = time.perf_counter() - start
        self.distill_seconds.append(round(seconds, 3))
        self._updates += 1
        self._set(self._trim_to_bytes(SyntheticBuffer.concat([_pad(p, k) for p in parts], meta=self._meta()).quantized(self.storage)))
        return seconds

    def load(self, path: str | os.PathLike) -> SyntheticBuffer:
        """Replace the held buffer with one saved by :meth:`save` / :meth:`SyntheticBuffer.save`."""
        buffer = SyntheticBuffer.load(path)
        self.set_synthetic(buffer)
        return buffer

    def set_synthetic(self, buffer: SyntheticBuffer) -> None:
        """Hold ``buffer`` (e.g. distilled elsewhere); it must fit the budget and the stream's dataset."""
        if not isinstance(buffer, SyntheticBuffer):
            raise TypeError(f"expected a SyntheticBuffer, got {type(buffer).__name__}")
        ours, theirs = self.dataset_meta.get("dataset"), buffer.meta.get("dataset")
        if ours and theirs and ours != theirs:
            raise ValueError(f"the buffer was distilled from {theirs!r} but this stream is {ours!r}")
        expected = self.dataset_meta.get("in_shape")
        if expected and len(buffer) and tuple(expected) != buffer.decoded_shape:
            raise ValueError(
                f"the buffer holds images of shape {buffer.decoded_shape} but the stream's dataset "
                f"{ours!r} has shape {tuple(expected)}"
            )
        if len(buffer) > self.max_size:
            raise ValueError(f"the buffer holds {len(buffer)} images, more than max_size={self.max_size}")
        if self.mem_bytes is not None and buffer.nbytes(self.storage) > self.mem_bytes:
            raise ValueError(f"the buffer takes {buffer.nbytes(self.storage)} bytes at {self.storage}, more than mem_bytes={self.mem_bytes}")
        self._set(buffer)

    def save(self, path: str | os.PathLike, storage: str | None = None) -> Path:
        """Write the held buffer in ReplayKit's safetensors format (atomically), by default at its storage precision."""
        if self.synthetic is None:
            raise ValueError("the buffer is empty: nothing has been distilled yet")
        return self.synthetic.save(path, storage=storage or self.storage)

    def nbytes(self) -> int:
        """Bytes the held buffer takes at its storage precision (labels included)."""
        return 0 if self.synthetic is None else self.synthetic.nbytes(self.storage)

    # --------------------------------------------------------------- helpers
    def view(self, images: torch.Tensor) -> torch.Tensor | None:
        """Normalised full-resolution ``images`` as this buffer would give them back.

        At the held images' resolution (decoded the same way) and, with ``storage="jpeg"``, through the
        JPEG codec at ``jpeg_quality``. ``None`` while nothing is held, or when storing changes nothing
        a learner could pick up (full resolution, float or uint8). For :func:`mix_view`.
        """
        held = self.synthetic
        if held is None or not len(held):
            return None
        factor = held.decoder_factor
        if (factor == 1 and self.storage != "jpeg") or images.shape[-1] % factor or images.shape[-2] % factor:
            return None
        small = torch.nn.functional.avg_pool2d(images, factor) if factor > 1 else images
        if self.storage == "jpeg":
            from . import jpeg

            mean, std = (torch.tensor(self.dataset_meta[k], dtype=torch.float32).view(1, -1, 1, 1) for k in ("mean", "std"))
            small = jpeg.roundtrip(small.cpu(), self.jpeg_quality, mean, std).to(images.device)  # the codec runs on the host
        return decode_upsample(small, factor)

    def _set(self, buffer: SyntheticBuffer) -> None:
        self.synthetic = buffer
        self._dataset_cache = None

    def _meta(self) -> dict[str, Any]:
        meta = dict(self.dataset_meta)
        meta.update(
            method=self.method,
            method_options=self.method_options,
            mem_size=self.max_size,
            recompress=self.recompress,
            storage=self.storage,
            **({"core": self.core, "core_ipc": self.core_ipc()} if self.core is not None else {}),
            **({"memory_choice": self.memory_choice} if self.memory_choice is not None else {}),
            seed=self.seed,
            experiences=self._updates,
            distill_seconds=list(self.distill_seconds),
        )
        factor = int(self.method_options.get("factor", 1))
        if factor > 1:
            meta["decoder"] = {"kind": "upsample", "factor": factor, "mode": "bilinear"}
        if int(self.method_options.get("bits", 8)) < 8:
            meta["pixel_bits"] = int(self.method_options["bits"])
        if self.soft_labels:
            meta.update(soft_label_storage="float16", soft_temperature=self.soft_temperature)
        if self.storage == "jpeg":
            meta["jpeg_quality"] = self.jpeg_quality
        return meta

    def _storage_meta(self) -> dict[str, Any]:
        """The keys that say how images are stored (precision, JPEG quality, normalisation)."""
        meta = self._meta()
        return {k: meta[k] for k in ("pixel_bits", "jpeg_quality", "mean", "std") if k in meta}

    def _fit_jpeg_budget(self, images: torch.Tensor) -> None:
        """With jpeg storage, size the image budget from the JPEG size of this experience's real images."""
        from . import jpeg

        mean, std = (torch.tensor(self.dataset_meta[k], dtype=torch.float32).view(1, -1, 1, 1) for k in ("mean", "std"))
        sample = images[torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(self.seed))[:256]]
        header, bodies = jpeg.encode(((sample * std + mean).clamp(0, 1) * 255).round().to(torch.uint8), self.jpeg_quality)
        per_image = sum(b.numel() for b in bodies) / len(bodies) + 1 + (logit_row_bytes(self.num_classes) if self.logits else 0)
        self.max_size = max(1, int((self.mem_bytes - header.numel()) // per_image))

    def _trim_to_bytes(self, buffer: SyntheticBuffer) -> SyntheticBuffer:
        """Drop images (last ones of the fullest classes first) until the buffer fits ``mem_bytes``."""
        if self.storage != "jpeg" or self.mem_bytes is None or buffer.nbytes("jpeg") <= self.mem_bytes:
            return buffer  # fixed-size storage: the quotas already keep the budget
        header, bodies = buffer._jpeg_codes()
        label_cost = buffer.label_nbytes() // len(buffer)
        costs = [b.numel() + label_cost for b in bodies]
        total = header.numel() + sum(costs)
        keep = {c: buffer.indices_of(c).tolist() for c in buffer.classes}
        while total > self.mem_bytes and sum(len(v) for v in keep.values()) > len(keep):
            fullest = max(keep, key=lambda c: (len(keep[c]), -c))
            total -= costs[keep[fullest].pop()]
        return buffer.subset(sorted(i for v in keep.values() for i in v))

    def _distill_new_classes(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int], quotas: dict[int, int],
                             k: int) -> dict[int, SyntheticBuffer]:
        """One distillation per new class: here, or sharded over ``workers`` / ``group`` (same seeds, same bytes)."""
        masks = {c: labels == c for c in classes}
        ipcs = {c: min(quotas[c], int(masks[c].sum())) for c in classes}
        cores = {c: min(ipcs[c], self.core_ipc()) for c in classes} if self.core is not None else ipcs
        if self.workers in (None, 1) and self.group is None:
            parts = {c: self._run_method(images[masks[c]], labels[masks[c]], cores[c], k, c) for c in classes}
        else:
            from .distributed import ClassJob, distill_per_class

            jobs = [ClassJob(self.method, dict(self.method_options, device=self._device()), cores[c], self._class_seed(c), images[masks[c]],
                             labels[masks[c]], k, dict(self.dataset_meta)) for c in classes]
            parts = dict(zip(classes, distill_per_class(jobs, workers=self.workers, group=self.group, all_ranks=self.group is not None)))
        if self.core is None:
            return parts
        return {c: self._with_real_fill(parts[c], images[masks[c]], labels[masks[c]], ipcs[c] - cores[c], k, c) for c in classes}

    def core_ipc(self) -> int:
        """Distilled images per class with ``core``: its share of the final quota ``max_size // num_classes`` (at least 1)."""
        if self.core is None or not self.num_classes:
            raise ValueError("core_ipc needs core and num_classes")
        return max(1, round(self.core * (self.max_size // self.num_classes)))

    def _with_real_fill(self, core: SyntheticBuffer, images: torch.Tensor, labels: torch.Tensor, count: int, k: int,
                        cls: int) -> SyntheticBuffer:
        """``core`` followed by ``count`` seeded random real images of the class (stored at the core's resolution)."""
        if count <= 0:
            return core
        fill = _distill.make("random", ipc=count, seed=self._class_seed(cls) + 17, progress=False).distill(
            images, labels, num_classes=k, meta=self.dataset_meta)
        factor = core.decoder_factor
        return SyntheticBuffer.concat([core, _downsampled(fill, factor)], meta=core.meta)

    def _class_seed(self, cls: int) -> int:
        return self.seed * 1_000_003 + self._updates * 1009 + cls

    def _learner_outputs(self, part: SyntheticBuffer, learner: torch.nn.Module, k: int) -> torch.Tensor:
        """The learner's logits ``[N, k]`` on the images of ``part`` as they will be replayed (stored, then decoded)."""
        was_training = learner.training
        learner.eval()
        with torch.no_grad():  # computed where the learner lives, kept on the host with the buffer
            images = part.with_meta(**self._storage_meta()).quantized(self.storage).decoded_images()
            logits = learner(images.to(module_device(learner))).cpu()
        learner.train(was_training)
        if logits.shape[1] != k:
            logits = torch.nn.functional.pad(logits, (0, k - logits.shape[1]), value=-1e4)[:, :k]
        return logits

    def _learner_labels(self, part: SyntheticBuffer, learner: torch.nn.Module, k: int) -> SyntheticBuffer:
        """``part`` relabelled with the learner's softened predictions on the images it will replay."""
        logits = self._learner_outputs(part, learner, k)
        probs = _float16_rows(torch.softmax(logits / self.soft_temperature, dim=1))
        meta = dict(part.meta, soft_label_storage="float16", soft_temperature=self.soft_temperature)
        return SyntheticBuffer(part.images, probs, k, part.class_ids, meta)

    def _check_budget(self, part: SyntheticBuffer) -> None:
        """The method must hold images at the resolution the byte budget was computed for."""
        expected = int(self.method_options.get("factor", 1))
        if part.decoder_factor != expected:
            raise RuntimeError(f"{self.method} returned images with decoder factor {part.decoder_factor}, the budget assumed {expected}")

    def _run_method(self, images: torch.Tensor, labels: torch.Tensor, ipc: int, k: int, cls: int) -> SyntheticBuffer:
        seed = self._class_seed(cls)
        options = dict(self.method_options)
        if self.learner_aware and getattr(self, "_learner", None) is not None:
            options["learner"] = self._learner
        if _distill.REGISTRY[self.method].selects:  # the stored form is the buffer's business: real images go through it as picked
            factor = int(options.pop("factor", 1))
            options.pop("bits", None)  # applied by the uint8 storage (pixel_bits)
            picked = _distill.make(self.method, ipc=ipc, seed=seed, progress=self.progress, device=self._device(), **options).distill(
                images, labels, num_classes=k, meta=self.dataset_meta)
            return _downsampled(picked, factor)
        distiller = _distill.make(self.method, ipc=ipc, seed=seed, progress=self.progress, device=self._device(), **options)
        return distiller.distill(images, labels, num_classes=k, meta=self.dataset_meta)

    def _device(self) -> str:
        """Where this update distills: ``distill_device``, else the strategy's device, else the CPU."""
        return getattr(self, "distill_device", None) or getattr(self, "_work_device", None) or "cpu"

    def _recompress(self, held: SyntheticBuffer, quotas: dict[int, int], desc: str) -> SyntheticBuffer:
        """Shrink each class of ``held`` to its quota (classes already within it are kept as they are)."""
        parts = []
        for cls in held.classes:
            part = held.select_classes([cls])
            quota = quotas[cls]
            if len(part) > quota:
                if self.recompress == "prefix":
                    part = part.subset(torch.arange(quota))
                elif self.recompress == "select":
                    gen = torch.Generator().manual_seed(self.seed * 7919 + self._updates * 31 + cls)
                    part = part.subset(torch.randperm(len(part), generator=gen)[:quota].sort().values)
                else:
                    chosen = self._run_method(part.decoded_images(), part.class_ids, quota, held.num_classes, cls)
                    # a selecting method picks held images: keep their own (possibly soft) labels
                    part = part.subset(_match_rows(part.decoded_images(), chosen.images)) if _distill.REGISTRY[self.method].selects else chosen
            parts.append(part)
        return SyntheticBuffer.concat(parts, meta=held.meta)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_dataset_cache"] = None  # rebuilt on demand; keeps checkpoints small
        state["_learner"] = None
        state["group"] = None  # a process group belongs to the running processes, not to a checkpoint
        return state


def _match_rows(pool: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """Indices into ``pool`` of the images in ``picked`` (each pool row used at most once)."""
    flat_pool, used, index = pool.flatten(1), torch.zeros(pool.shape[0], dtype=torch.bool), []
    for row in picked.flatten(1):
        hits = torch.nonzero((flat_pool == row).all(1) & ~used).flatten()
        if hits.numel() == 0:
            raise RuntimeError("a selecting distiller returned an image that is not in its input")
        used[hits[0]] = True
        index.append(int(hits[0]))
    return torch.tensor(index, dtype=torch.int64)


def _downsampled(part: SyntheticBuffer, factor: int) -> SyntheticBuffer:
    """Real images of ``part`` held at ``1/factor`` resolution (average-pooled), decoded by bilinear upsampling."""
    if factor == 1:
        return part
    meta = dict(part.meta, decoder={"kind": "upsample", "factor": factor, "mode": "bilinear"})
    return SyntheticBuffer(torch.nn.functional.avg_pool2d(part.images, factor), part.labels, part.num_classes, part.class_ids, meta)


def _float16_rows(probs: torch.Tensor) -> torch.Tensor:
    """Probability rows as float16 keeps them (renormalised in float32 so they still sum to one)."""
    held = probs.half().float().clamp_min(0)
    return held / held.sum(1, keepdim=True)


def _pad(buffer: SyntheticBuffer, num_classes: int) -> SyntheticBuffer:
    """The same buffer over a label space of ``num_classes`` (soft rows padded with zeros)."""
    if buffer.num_classes == num_classes:
        return buffer
    labels = buffer.labels
    if buffer.is_soft:
        labels = torch.nn.functional.pad(labels, (0, num_classes - buffer.num_classes))
    return buffer.relabelled(labels, num_classes)


def low_resolution_view(images: torch.Tensor, factor: int) -> torch.Tensor:
    """``images`` as a buffer held at ``1/factor`` resolution would give them back: average-pooled, then decoded."""
    return decode_upsample(torch.nn.functional.avg_pool2d(images, factor), factor)


class MixedViewPlugin(SupervisedPlugin):
    """Train on a random share ``p`` of every mini-batch as a lossy buffer gives images back.

    A buffer that holds images lossily (at reduced resolution, as JPEG) replays *degraded*
    images of the old classes while the new classes arrive clean: under long training the
    degradation alone tells new from old, and at test time the (clean) old-class images are
    taken for new classes. Showing a share of each training mini-batch through the same codec
    (``view``: normalised images -> what the buffer would give back, or ``None`` when there is
    nothing to imitate) removes that shortcut. Evaluation is untouched.
    :class:`DistilledReplayPlugin` does this by itself (``mix``).
    """

    def __init__(self, view: Callable[[torch.Tensor], torch.Tensor | None], p: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p!r}")
        self.view, self.p = view, float(p)
        self._gen = torch.Generator().manual_seed(seed * 7_777 + 11)

    def before_forward(self, strategy: "SupervisedTemplate", **kwargs: Any) -> None:
        mix_view(strategy, self.view, self.p, self._gen)


class MixedResolutionPlugin(MixedViewPlugin):
    """:class:`MixedViewPlugin` for a buffer held at ``1/factor`` resolution (:func:`low_resolution_view`)."""

    def __init__(self, factor: int = 2, p: float = 0.5, seed: int = 0) -> None:
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be a positive int, got {factor!r}")
        super().__init__(lambda images: _resolution_view(images, factor), p, seed)
        self.factor = factor


def _resolution_view(images: torch.Tensor, factor: int) -> torch.Tensor | None:
    if factor == 1 or images.shape[-1] % factor or images.shape[-2] % factor:
        return None
    return low_resolution_view(images, factor)


def mix_view(strategy: "SupervisedTemplate", view: Callable[[torch.Tensor], torch.Tensor | None], p: float,
             gen: torch.Generator) -> None:
    """Replace a random share ``p`` of the current training mini-batch's images by ``view`` of them."""
    x = strategy.mbatch[0]
    if p == 0 or x.ndim != 4:
        return
    pick = torch.rand(x.shape[0], generator=gen) < p  # drawn on the host: the same share on every device
    if not pick.any():
        return
    pick = pick.to(x.device, non_blocking=True)
    viewed = view(x[pick])
    if viewed is not None:
        x = x.clone()
        x[pick] = viewed.to(x.device, x.dtype)
        strategy.mbatch[0] = x


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
        distill_device: str | torch.device | None = None,
    ) -> None:
        if not (logit_loss_weight >= 0 and math.isfinite(logit_loss_weight)):
            raise ValueError(f"logit_loss_weight must be >= 0, got {logit_loss_weight!r}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must lie in [0, 1], got {mix!r}")
        if storage_policy is None:
            if mem_size is None and mem_bytes is None:
                mem_size = 100
            storage_policy = DistilledBuffer(
                mem_size, method, method_options, recompress=recompress, storage=storage, dataset_meta=dataset_meta,
                num_classes=num_classes, seed=seed, progress=progress, mem_bytes=mem_bytes, learner_aware=learner_aware,
                soft_labels=soft_labels, jpeg_quality=jpeg_quality, workers=workers, group=group, augment=augment,
                logits=logits, core=core, distill_device=distill_device,
            )
            mem_size = storage_policy.max_size
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
