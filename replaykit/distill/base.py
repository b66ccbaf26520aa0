"""The one interface every distiller and selection baseline implements.

Configure in ``__init__``, work in :meth:`Distiller.distill`. The base class
checks the input once (shapes, dtypes, NaN, label range, enough images per
class) so that methods only see clean data, and wraps the result in a
:class:`~replaykit.buffer.SyntheticBuffer` with uniform metadata.
"""

from __future__ import annotations

import abc
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..buffer import SyntheticBuffer
from ..device import resolve_device
from ..typed import check_positive_int

__all__ = ["Distiller", "DistillResult", "check_training_data", "check_loop_options"]


@dataclass
class DistillResult:
    """What a method hands back to the base class.

    ``labels`` are int64 ``[M]`` or probability rows ``[M, K]``; ``class_ids`` say
    which class each image stands for.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_ids: torch.Tensor
    extra_meta: dict[str, Any] | None = None


def check_training_data(images: torch.Tensor, labels: torch.Tensor, num_classes: int | None) -> int:
    """Validate real training data; return the number of classes of the label space."""
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("images and labels must be torch tensors")
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point (normalised), got {images.dtype}")
    if labels.ndim != 1 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be an int64 vector, got {labels.dtype} of shape {tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise ValueError("no training images were given")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    lo, hi = int(labels.min()), int(labels.max())
    k = num_classes if num_classes is not None else hi + 1
    if lo < 0 or hi >= k:
        raise ValueError(f"labels must lie in [0, {k - 1}], found range [{lo}, {hi}]")
    return k


def check_loop_options(iterations: int, time_budget: float | None, init: str) -> None:
    """Validate the options every learned (iterative) method shares; raise ``ValueError`` naming the bad one."""
    check_positive_int("iterations", iterations)
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and math.isfinite(time_budget) and time_budget > 0):
        raise ValueError(f"time_budget must be a positive number of seconds or None, got {time_budget!r}")
    if init not in ("real", "noise"):
        raise ValueError(f"init must be 'real' or 'noise', got {init!r}")


class Distiller(abc.ABC):
    """Turns real images of some classes into ``ipc`` synthetic images per class.

    Args:
        ipc: images per class to produce.
        seed: all randomness (initialisation, networks, augmentation) derives from it.
        progress: show a tqdm progress bar.
        device: where the work runs (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``); the input may live
            anywhere, the returned buffer is always on the host. Random draws come from CPU generators,
            so a seed makes the same draws on every device.
    Subclasses add their own options (iterations, time budget, network, ...).
    """

    name: ClassVar[str] = ""
    #: True for methods that pick real images rather than synthesise new ones.
    selects: ClassVar[bool] = False

    def __init__(self, ipc: int = 10, *, seed: int = 0, progress: bool = True, device: str | torch.device | None = "cpu") -> None:
        check_positive_int("ipc (images per class)", ipc)
        self.ipc = ipc
        self.seed = seed
        self.progress = progress
        self.device = str(resolve_device(device))

    def distill(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        num_classes: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> SyntheticBuffer:
        """Distill ``(images, labels)`` into a buffer of ``ipc`` images per class present.

        ``num_classes`` is the size of the label space (default ``max(label)+1``);
        ``meta`` (dataset name, mean, std, class names...) is copied into the buffer.
        Raises ``ValueError`` naming the problem for bad input, including a class
        with fewer than ``ipc`` images.
        """
        k = check_training_data(images, labels, num_classes)
        classes, counts = torch.unique(labels, return_counts=True)
        short = [(int(c), int(n)) for c, n in zip(classes, counts) if n < self.ipc]
        if short:
            detail = ", ".join(f"class {c} has {n}" for c, n in short)
            raise ValueError(f"{detail}: fewer real images than the {self.ipc} requested per class")
        # the work runs on self.device; labels (and every index drawn from them) stay on the host
        images, labels = images.float().to(self.device), labels.cpu()
        start = time.perf_counter()
        result = self._distill(images, labels, [int(c) for c in classes], k)
        if images.is_cuda:  # count the queued GPU work in the seconds
            torch.cuda.synchronize(images.device)
        seconds = time.perf_counter() - start
        buffer_meta = dict(meta or {})
        buffer_meta.update(
            method=self.name,
            ipc=self.ipc,
            seed=self.seed,
            options=self.get_params(),
            distill_seconds=round(seconds, 3),
            **(result.extra_meta or {}),
        )
        return SyntheticBuffer(result.images.detach().float().cpu().contiguous(), result.labels.detach().cpu(), k,
                               result.class_ids.cpu(), buffer_meta)

    @abc.abstractmethod
    def _distill(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int], num_classes: int) -> DistillResult:
        """Method body: inputs are validated; return ``ipc`` images for each of ``classes``."""

    def get_params(self) -> dict[str, Any]:
        """The JSON-friendly constructor options (recorded in the buffer's metadata)."""
        params = {}
        for key, value in vars(self).items():
            if key.startswith("_"):
                continue
            if isinstance(value, (int, float, str, bool, type(None))):
                params[key] = value
            elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str, bool)) for v in value):
                params[key] = list(value)
        return params

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"
