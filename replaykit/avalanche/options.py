"""The storage policy's options, checked together: the ``method="auto"`` choice, how options constrain each
other, and the image budget (``max_size``) a byte budget gives."""

from __future__ import annotations

from typing import Any

import torch

from .. import codecs
from .. import distill as _distill
from .. import registry as _registry
from ..buffer import STORAGE_DTYPES
from ..distill.dm import MatchingDistiller
from .budget import images_for_bytes

__all__ = ["RECOMPRESS_MODES", "resolve_options"]

RECOMPRESS_MODES = ("distill", "select", "prefix")


def resolve_options(max_size: int | None, method: str, method_options: dict[str, Any] | None, *, recompress: str, storage: str,
                    dataset_meta: dict[str, Any] | None, num_classes: int | None, mem_bytes: int | None, learner_aware: bool,
                    soft_labels: bool, soft_temperature: float, jpeg_quality: int, workers: int | None, group: Any,
                    logits: bool, core: float | None, distill_device: str | torch.device | None) -> dict[str, Any]:
    """The options :class:`~replaykit.avalanche.storage.DistilledBuffer` keeps, after ``method="auto"`` chose its
    own; the first problem found raises ``ValueError`` naming it (see the buffer's docstring for each option)."""
    choice = None
    if method == "auto":  # distill, hybrid or select, from the measured table in replaykit.memory_choice
        if mem_bytes is None or not num_classes:
            raise ValueError("method='auto' chooses by the bytes each class gets: it needs mem_bytes and num_classes")
        if method_options or core is not None:
            raise ValueError("method='auto' sets the method's options and core itself: leave method_options and core unset")
        from ..memory_choice import choose_memory

        if not (dataset_meta or {}).get("in_shape"):
            raise ValueError("method='auto' chooses by raw images per class: it needs dataset_meta with in_shape (dataset_info(name).meta())")
        choice = choose_memory(mem_bytes / num_classes, dataset_meta["in_shape"])
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
    fixed_size = storage not in STORAGE_DTYPES or codecs.for_storage(storage).image_nbytes((1, 1, 1)) is not None
    if not fixed_size and mem_bytes is None:
        raise ValueError(f"storage={storage!r} needs a budget in bytes (mem_bytes): its images have no fixed size")
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
    learned_for = int((method_options or {}).get("jpeg_quality", 0))
    if learned_for and (storage != "jpeg" or learned_for != jpeg_quality):
        raise ValueError(f"method_options jpeg_quality={learned_for} learns images for JPEG codes at that quality: it needs "
                         f"storage='jpeg' with jpeg_quality={learned_for} (got storage={storage!r}, jpeg_quality={jpeg_quality})")
    if not fixed_size:
        if max_size is not None:
            raise ValueError(f"give mem_bytes, not max_size, with storage={storage!r}")
        max_size = 1  # set from the first experience's encoded sizes (see _fit_content_budget)
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
    _registry.lookup(_distill.REGISTRY, method, "distillation method")  # an unknown method is named here, before any work
    options = dict(method_options or {})
    clash = {"ipc", "seed", "progress", "learner", "device"} & options.keys()
    if clash:
        raise ValueError(f"method_options must not set {sorted(clash)}: the buffer chooses them (device: distill_device=)")
    if distill_device is not None:
        distill_device = str(_resolve_device(distill_device))
    if recompress not in RECOMPRESS_MODES:
        raise ValueError(f"recompress must be one of {RECOMPRESS_MODES}, got {recompress!r}")
    if codecs.REGISTRY[storage].stores_pixels and not {"mean", "std"} <= set(dataset_meta or {}):
        raise ValueError(f"storage={storage!r} needs dataset_meta with the dataset's mean and std (dataset_info(name).meta())")
    return dict(max_size=max_size, method=method, method_options=options, recompress=recompress, storage=storage,
                jpeg_quality=jpeg_quality, logits=logits, core=core, distill_device=distill_device,
                memory_choice=None if choice is None else choice.to_json())


def _resolve_device(device: Any) -> Any:
    """The package's ``resolve_device``, looked up there when called (so one swap, e.g. in a test, covers the package)."""
    from . import resolve_device

    return resolve_device(device)
