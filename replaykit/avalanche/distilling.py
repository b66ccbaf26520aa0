"""How the storage policy makes a class's held images: one distillation per class (here or sharded over
processes), the real fill of a hybrid ``core`` memory, the learner's labels and logits, and re-compression
of a class whose quota shrank. A mixin of :class:`~replaykit.avalanche.storage.DistilledBuffer`: it reads the
policy's options (``method``, ``method_options``, ``seed``, ``core``, ...)."""

from __future__ import annotations

from typing import Any

import torch

from .. import distill as _distill
from ..buffer import SyntheticBuffer
from ..device import module_device
from .options import BufferConfig
from .parts import _downsampled, _float16_rows, _match_rows

__all__ = ["ClassDistiller"]


class DistillationError(RuntimeError):
    """Distilling one class of an experience failed; the message names the class and the reason."""


class ClassDistiller:
    """Per-class distillation for :class:`~replaykit.avalanche.storage.DistilledBuffer` (seeds derive from ``seed``,
    the update count and the class, so the same options give the same buffer)."""

    method: str
    method_options: dict[str, Any]
    seed: int
    progress: bool
    core: float | None
    fill: str
    complement: bool
    resolved: BufferConfig  # the configuration in force (``factor`` and the rest)
    num_classes: int | None
    max_size: int
    dataset_meta: dict[str, Any]
    storage: str
    soft_temperature: float
    learner_aware: bool
    recompress: str
    workers: int | None
    group: Any
    _updates: int

    def _distill_new_classes(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int], quotas: dict[int, int],
                             k: int) -> dict[int, SyntheticBuffer]:
        """One distillation per new class: here, or sharded over ``workers`` / ``group`` (same seeds, same bytes)."""
        masks = {c: labels == c for c in classes}
        ipcs = {c: min(quotas[c], int(masks[c].sum())) for c in classes}
        cores = {c: min(ipcs[c], self.core_ipc()) for c in classes} if self.core is not None else ipcs
        fills = {c: self._real_fill(images[masks[c]], labels[masks[c]], ipcs[c] - cores[c], k, c) for c in classes} if self.core is not None else {}
        extra = {c: {"beside": {c: self._kept_beside(fills[c])}} for c in classes if fills.get(c) is not None} if self.complement else {}
        if getattr(_distill.REGISTRY[self.method], "counts_seen_classes", False):  # the classes the learner was trained on
            for c in classes:
                extra.setdefault(c, {})["seen"] = len(quotas)
        if self.workers in (None, 1) and self.group is None:
            parts = {c: self._run_method(images[masks[c]], labels[masks[c]], cores[c], k, c, extra.get(c)) for c in classes}
        else:
            from ..distributed import ClassJob, distill_per_class

            jobs = [ClassJob(self.method, dict(self.method_options, device=self._device(), **extra.get(c, {})), cores[c], self._class_seed(c),
                             images[masks[c]], labels[masks[c]], k, dict(self.dataset_meta)) for c in classes]
            parts = dict(zip(classes, distill_per_class(jobs, workers=self.workers, group=self.group, all_ranks=self.group is not None)))
        if self.core is None:
            return parts
        return {c: parts[c] if fills[c] is None else SyntheticBuffer.concat([parts[c], fills[c]], meta=parts[c].meta) for c in classes}

    def core_ipc(self) -> int:
        """Distilled images per class with ``core``: its share of the final quota ``max_size // num_classes`` (at least 1)."""
        if self.core is None or not self.num_classes:
            raise ValueError("core_ipc needs core and num_classes")
        return max(1, round(self.core * (self.max_size // self.num_classes)))

    def _real_fill(self, images: torch.Tensor, labels: torch.Tensor, count: int, k: int, cls: int) -> SyntheticBuffer | None:
        """The real part of a hybrid memory: ``count`` images of the class picked by ``fill`` in its order, held at the
        core's resolution after the core (``None`` when the core takes the whole quota)."""
        if count <= 0:
            return None
        fill = _distill.make(self.fill, ipc=count, seed=self._class_seed(cls) + 17, progress=False, device=self._device()).distill(
            images, labels, num_classes=k, meta=self.dataset_meta)
        return _downsampled(fill, self.resolved.factor)

    def _kept_beside(self, fill: SyntheticBuffer) -> torch.Tensor:
        """The fill images a ``complement`` core is learned beside: the prefix every class keeps at its final quota, as it
        will be replayed (stored, then decoded)."""
        kept = max(1, min(len(fill), self.max_size // self.num_classes - self.core_ipc()))
        return fill.subset(torch.arange(kept)).with_meta(**self._storage_meta()).quantized(self.storage).decoded_images()

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
        expected = self.resolved.factor
        if part.decoder_factor != expected:
            raise RuntimeError(f"{self.method} returned images with decoder factor {part.decoder_factor}, the budget assumed {expected}")

    def _run_method(self, images: torch.Tensor, labels: torch.Tensor, ipc: int, k: int, cls: int,
                    extra: dict[str, Any] | None = None) -> SyntheticBuffer:
        """The method on one class (``extra``: options added for this class); its failure names the class and the
        reason (the held buffer is only replaced once every class of an experience is done, so it stays as it was)."""
        try:
            return self._run_method_on(images, labels, ipc, k, cls, extra)
        except Exception as exc:
            raise DistillationError(f"distilling class {cls} with {self.method!r} failed: {type(exc).__name__}: {exc}; "
                                    "the held buffer is unchanged") from exc

    def _run_method_on(self, images: torch.Tensor, labels: torch.Tensor, ipc: int, k: int, cls: int,
                       extra: dict[str, Any] | None) -> SyntheticBuffer:
        seed = self._class_seed(cls)
        options = dict(self.method_options, **(extra or {}))
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
