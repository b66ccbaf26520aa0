"""The storage policy: an Avalanche ``ExemplarsBuffer`` that distills each experience into a budget of held images."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_classification_dataset
from avalanche.training.storage_policy import ExemplarsBuffer

from .. import codecs
from .. import distill as _distill
from ..buffer import SyntheticBuffer, logit_row_bytes
from ..progress import progress_bar
from .budget import class_quotas
from .options import RECOMPRESS_MODES, BufferConfig, _resolve_device, check_execution, config_from, resolve, sized_by_content
from .parts import _pad
from .datasets import _LabelledImages, dataset_tensors, replay_transform
from .distilling import ClassDistiller
from ..typed import check_positive_int

__all__ = ["DistilledBuffer", "RECOMPRESS_MODES"]


class _Resolved:
    """One field of the buffer's resolved :class:`BufferConfig`, read-only on the buffer (the config is the state)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, buffer: Any, owner: type | None = None) -> Any:
        if buffer is None:
            return self
        value = getattr(buffer.resolved, self.name)
        return dict(value) if isinstance(value, dict) else value  # a copy: the configuration stays as resolved

    def __set__(self, buffer: Any, value: Any) -> None:
        raise AttributeError(f"{self.name} is part of the buffer's configuration (DistilledBuffer.resolved): "
                             "make a new buffer to change it")


class DistilledBuffer(ClassDistiller, ExemplarsBuffer):
    """Avalanche storage policy holding a fixed-size buffer of distilled images.

    Its options are a :class:`~replaykit.avalanche.options.BufferConfig`: pass one as ``config`` or give them as
    keyword arguments (they build the same configuration; not both). ``dataset_meta``, ``progress``, ``workers``,
    ``group`` and ``distill_device`` (what the stream is, where distillation runs) are arguments either way. The held
    buffer's metadata carries the configuration (``meta["config"]``), so a saved buffer says how it was made.

    Args:
        max_size: M, the most images held in total.
        method: a name from :func:`replaykit.distill.available` (``dm`` is the default), or ``"auto"``: distill,
            hybrid or select by the raw images each class's bytes buy, from the measured table in :mod:`replaykit.memory_choice`
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
        fill: how a hybrid memory picks its real images (a selecting method: ``"random"``, the default,
            ``"herding"`` or ``"kcenter"``), in that method's order so that the prefix kept as classes
            arrive is still its pick. Needs ``core``.
        complement (set through ``config``): the fill is picked first and the core is learned beside the part of it
            every class keeps (``dm`` matches the class against core and fill together), so the distilled images add
            what the real ones lack rather than their mean again. Needs ``core`` below 1.
        epochs: epochs per experience of the strategy this buffer serves; ``method="auto"`` chooses for them
            (:func:`replaykit.memory_choice.choose_memory`) and the plugin refuses a strategy that trains otherwise.
        distill_device: where distillation runs. ``None`` (default): the strategy's device
            (``strategy.device``) when Avalanche calls :meth:`post_adapt`, the CPU for direct
            :meth:`update_from_tensors` calls. The held images always stay on the host (they are the
            memory that is counted); the learner may live on any device.
    """

    config: BufferConfig | None = None  # the class's value, for a buffer checkpointed before it had one
    method = _Resolved()
    method_options = _Resolved()
    recompress = _Resolved()
    storage = _Resolved()
    jpeg_quality = _Resolved()
    num_classes = _Resolved()
    seed = _Resolved()
    mem_bytes = _Resolved()
    learner_aware = _Resolved()
    soft_labels = _Resolved()
    soft_temperature = _Resolved()
    augment = _Resolved()
    logits = _Resolved()
    core = _Resolved()
    fill = _Resolved()
    complement = _Resolved()
    epochs = _Resolved()

    def __init__(
        self,
        max_size: int | None = None,
        method: str = "dm",
        method_options: dict[str, Any] | None = None,
        *,
        config: BufferConfig | None = None,
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
        fill: str = "random",
        epochs: int = 1,
        distill_device: str | torch.device | None = None,
    ) -> None:
        self.config = config_from(config, dict(
            max_size=max_size, method=method, method_options=method_options, recompress=recompress, storage=storage,
            num_classes=num_classes, seed=seed, mem_bytes=mem_bytes, learner_aware=learner_aware, soft_labels=soft_labels,
            soft_temperature=soft_temperature, jpeg_quality=jpeg_quality, augment=augment, logits=logits, core=core, fill=fill,
            epochs=epochs))
        resolved, max_size, self.memory_choice = resolve(self.config, dataset_meta)
        self.distill_device = check_execution(resolved, workers, group, distill_device)
        super().__init__(max_size)
        self.resolved = resolved  # the configuration in force (``method="auto"`` replaced by its choice)
        self.dataset_meta = dict(dataset_meta or {})
        self.progress = progress
        self.workers = workers
        self.group = group
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
        self._work_device = None if strategy_device is None else str(_resolve_device(strategy_device))
        try:
            self.update_from_tensors(images, labels, learner=learner)
        finally:
            self._work_device = None

    def resize(self, strategy: Any, new_size: int) -> None:
        """Change M; held classes are re-compressed when it shrinks."""
        check_positive_int("new_size", new_size)
        self.max_size = new_size
        if self.synthetic is not None and len(self.synthetic):
            quotas = class_quotas(self.synthetic.classes, new_size)
            self._set(self._recompress(self.synthetic, quotas, desc="resize").quantized(self.storage))

    # ----------------------------------------------------------- ReplayKit API
    def check_experience(self, classes: Sequence[int], image_shape: Sequence[int] | None = None) -> None:
        """Raise ``ValueError`` if adding ``classes`` (of ``image_shape``) would break the budget or the buffer."""
        seen = set(self.synthetic.classes if self.synthetic is not None else []) | {int(c) for c in classes}
        if not (self._sized_by_content and self.synthetic is None):  # jpeg: the image budget is known after the first experience
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
        try:
            return self._update(images, labels, learner)
        finally:
            self._learner = None  # never held between experiences, nor after a failure (checkpoints stay small)

    def _update(self, images: torch.Tensor, labels: torch.Tensor, learner: torch.nn.Module | None) -> float:
        if self._sized_by_content and self.synthetic is None:
            self._fit_content_budget(images)
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
        return codecs.compose(held.decoder_factor, self.codec.element).view(images)

    @property
    def codec(self) -> codecs.Codec:
        """How the held images are stored: :attr:`storage` (grey levels of ``method_options['bits']``, JPEG at
        :attr:`jpeg_quality`) at ``1/method_options['factor']`` resolution."""
        meta = self.dataset_meta
        return codecs.for_storage(self.storage, bits=int(self.method_options.get("bits", 8)), quality=self.jpeg_quality,
                                  factor=int(self.method_options.get("factor", 1)), mean=meta.get("mean"), std=meta.get("std"))

    @property
    def _sized_by_content(self) -> bool:
        """The storage's images have no fixed size (JPEG): the image budget follows from the first experience."""
        return sized_by_content(self.storage)

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
            **({"core": self.core, "core_ipc": self.core_ipc(), "fill": self.fill, "complement": self.complement} if self.core is not None else {}),
            **({"memory_choice": self.memory_choice} if self.memory_choice is not None else {}),
            seed=self.seed,
            experiences=self._updates,
            distill_seconds=list(self.distill_seconds),
        )
        meta.update(self.codec.meta())  # decoder, pixel_bits, jpeg_quality
        if self.soft_labels:
            meta.update(soft_label_storage="float16", soft_temperature=self.soft_temperature)
        if self.config is not None:  # None: a buffer checkpointed before it had one
            meta["config"] = self.config.to_json()  # how the buffer was made, as given (BufferConfig.from_json reads it)
        return meta

    def _storage_meta(self) -> dict[str, Any]:
        """The keys that say how images are stored (precision, JPEG quality, normalisation)."""
        meta = self._meta()
        return {k: meta[k] for k in ("pixel_bits", "jpeg_quality", "mean", "std") if k in meta}

    def _fit_content_budget(self, images: torch.Tensor) -> None:
        """With a storage whose sizes depend on the images (JPEG), size the image budget from the encoded size of
        256 of this experience's real images, at the held resolution (JPEG of half-resolution images is ~3x smaller)."""
        sample = images[torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(self.seed))[:256]]
        codec = self.codec
        codes = codec.encode(sample)
        header = int(codes.header.numel())
        # mean pixel bytes + the one-byte label + held logits, added in this order (a float sum: the order fixes its last bit)
        per_image = (codec.nbytes(codes) - header) / len(codes) + 1 + (logit_row_bytes(self.num_classes) if self.logits else 0)
        self.max_size = max(1, int((self.mem_bytes - header) // per_image))

    def _trim_to_bytes(self, buffer: SyntheticBuffer) -> SyntheticBuffer:
        """Drop images (last ones of the fullest classes first) until the buffer fits ``mem_bytes``."""
        if not self._sized_by_content or self.mem_bytes is None or buffer.nbytes(self.storage) <= self.mem_bytes:
            return buffer  # fixed-size storage: the quotas already keep the budget
        codes = buffer.codes(self.storage)
        label_cost = buffer.label_nbytes() // len(buffer)
        costs = [codecs.Codec.body_nbytes(b) + label_cost for b in codes.bodies]
        total = int(codes.header.numel()) + sum(costs)
        keep = {c: buffer.indices_of(c).tolist() for c in buffer.classes}
        while total > self.mem_bytes and sum(len(v) for v in keep.values()) > len(keep):
            fullest = max(keep, key=lambda c: (len(keep[c]), -c))
            total -= costs[keep[fullest].pop()]
        return buffer.subset(sorted(i for v in keep.values() for i in v))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_dataset_cache"] = None  # rebuilt on demand; keeps checkpoints small
        state["_learner"] = None
        state["group"] = None  # a process group belongs to the running processes, not to a checkpoint
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "resolved" not in state:  # a checkpoint from before the resolved configuration was kept whole
            known = {name: state.pop(name) for name in RESOLVED_FIELDS if name in state}
            given = None if known.get("mem_bytes") is not None else state.get("max_size")  # a budget in bytes sets max_size itself
            state["resolved"] = BufferConfig(max_size=given, **known)
        self.__dict__.update(state)


#: The resolved configuration's fields a buffer exposes as attributes (``max_size`` is its own: it changes).
RESOLVED_FIELDS = tuple(name for name, value in vars(DistilledBuffer).items() if isinstance(value, _Resolved))
