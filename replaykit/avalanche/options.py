"""The storage policy's configuration: :class:`BufferConfig`, one frozen object with strict types that says what a
:class:`~replaykit.avalanche.storage.DistilledBuffer` holds and how it makes it, checked in one place whether it is
built directly, from JSON, or from the buffer's (or the plugin's) keyword arguments. What needs the stream's dataset
(the ``method="auto"`` choice, the image budget a byte budget gives) is :func:`resolve`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .. import codecs
from .. import distill as _distill
from .. import registry as _registry
from ..buffer import STORAGE_DTYPES
from ..distill.dm import MatchingDistiller
from ..typed import BUFFER_CHOSEN, canonical_json, check_method_options, check_positive_int, check_type, checked_fields
from .budget import images_for_bytes

__all__ = ["RECOMPRESS_MODES", "BufferConfig", "config_from", "resolve", "check_execution", "sized_by_content"]

RECOMPRESS_MODES = ("distill", "select", "prefix")
#: Method options the buffer sets itself, per class and experience (the device: ``distill_device=``).
_BUFFER_SETS = (BUFFER_CHOSEN - {"self"}) | {"device"}


@dataclass(frozen=True)
class BufferConfig:
    """What a distilled storage policy holds and how it makes it (see :class:`DistilledBuffer` for each field).

    Types are strict: a bool field takes only ``True``/``False`` (not ``"False"``, not ``1``), an int field no bool;
    ``method_options`` are checked against the method's constructor (an unknown option is named). Where the
    distillation runs (``workers``, ``group``, ``distill_device``), progress bars and the dataset's metadata are not
    part of it: they are the buffer's other arguments. :attr:`identity` tells two configurations apart by every field.

    >>> BufferConfig(mem_bytes=78_500, method="dm", method_options={"iterations": 300}, storage="jpeg",
    ...              jpeg_quality=2, recompress="select", logits=True, num_classes=10).to_json()["jpeg_quality"]
    2
    """

    max_size: int | None = None
    mem_bytes: int | None = None
    method: str = "dm"
    method_options: dict[str, Any] = field(default_factory=dict)
    recompress: str = "distill"
    storage: str = "float32"
    jpeg_quality: int = 50
    num_classes: int | None = None
    seed: int = 0
    learner_aware: bool = False
    soft_labels: bool = False
    soft_temperature: float = 2.0
    augment: bool = False
    logits: bool = False
    core: float | None = None
    fill: str = "random"
    complement: bool = False
    epochs: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or _TYPES[f.name][1]:
                check_type(f.name, value, _TYPES[f.name][0])
        for name in ("soft_temperature", "core"):  # 2 and 2.0 are one configuration (and one identity)
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "method_options", dict(self.method_options))  # a copy: the caller's dict stays theirs
        if self.method == "auto":
            self._check_auto()
        else:
            self._check_method_options()
            self._check_combinations()
        self._check_budget()

    # --------------------------------------------------------------- checks
    def _check_auto(self) -> None:
        """``method="auto"`` chooses the method, its options, storage and logits from the bytes each class gets."""
        if self.mem_bytes is None or not self.num_classes:
            raise ValueError("method='auto' chooses by the bytes each class gets: it needs mem_bytes and num_classes")
        if self.method_options or self.core is not None or self.fill != "random" or self.complement:
            raise ValueError("method='auto' sets the method's options, core, fill and complement itself: leave them unset")

    def _check_method_options(self) -> None:
        method = _registry.lookup(_distill.REGISTRY, self.method, "distillation method")  # named before any work
        clash = _BUFFER_SETS & self.method_options.keys()
        if clash:
            raise ValueError(f"method_options must not set {sorted(clash)}: the buffer chooses them (device: distill_device=)")
        object.__setattr__(self, "method_options", check_method_options(self.method, self.method_options))
        if self.learner_aware and not issubclass(method, MatchingDistiller):
            raise ValueError(f"learner_aware needs a method that takes the learner (dm, dm-multi, recode, boundary), not {self.method!r}")
        if getattr(method, "needs_learner", False) and not self.learner_aware:
            raise ValueError(f"method {self.method!r} works on the learner: it needs learner_aware=True")

    def _check_combinations(self) -> None:
        if self.core is not None:
            if not 0 < self.core <= 1:
                raise ValueError(f"core must be a share in (0, 1], got {self.core!r}")
            if not self.num_classes:
                raise ValueError("core needs num_classes: the final quota is max_size // num_classes")
            if self.recompress != "prefix":
                raise ValueError(f"core needs recompress='prefix' (the real fill is dropped before the distilled core), got {self.recompress!r}")
        fill = _registry.lookup(_distill.REGISTRY, self.fill, "fill selection method")
        if not getattr(fill, "selects", False):
            raise ValueError(f"fill must be a selecting method (random, herding, kcenter), got {self.fill!r}")
        if self.fill != "random" and self.core is None:
            raise ValueError(f"fill={self.fill!r} picks the real images of a hybrid memory: it needs core")
        if self.complement and (self.core is None or self.core >= 1):
            raise ValueError("complement learns a hybrid memory's core beside its real fill: it needs core below 1")
        if self.complement and not getattr(_distill.REGISTRY[self.method], "learns_beside", False):
            raise ValueError(f"complement needs a method that matches beside fixed images (dm), not {self.method!r}")
        if self.logits and not self.num_classes:
            raise ValueError("logits needs num_classes (the size of the learner's output)")
        if self.logits and self.recompress == "distill" and not getattr(_distill.REGISTRY[self.method], "selects", False):
            raise ValueError("logits needs recompress='select' or 'prefix' (or a selecting method): an image distilled again has no logits of its learner")
        if self.recompress not in RECOMPRESS_MODES:
            raise ValueError(f"recompress must be one of {RECOMPRESS_MODES}, got {self.recompress!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be an int in [1, 100], got {self.jpeg_quality!r}")
        if self.soft_labels and not self.num_classes:
            raise ValueError("soft_labels needs num_classes (the size of the learner's output)")
        if not self.soft_temperature > 0:
            raise ValueError(f"soft_temperature must be > 0, got {self.soft_temperature!r}")
        if self.storage not in STORAGE_DTYPES:
            raise ValueError(f"storage must be one of {STORAGE_DTYPES}, got {self.storage!r}")
        if self.bits != 8 and self.storage != "uint8":
            raise ValueError(f"bits={self.bits} needs storage='uint8'")
        learned_for = int(self.method_options.get("jpeg_quality", 0))
        if learned_for and (self.storage != "jpeg" or learned_for != self.jpeg_quality):
            raise ValueError(f"method_options jpeg_quality={learned_for} learns images for JPEG codes at that quality: it needs "
                             f"storage='jpeg' with jpeg_quality={learned_for} (got storage={self.storage!r}, jpeg_quality={self.jpeg_quality})")

    def _check_budget(self) -> None:
        if self.mem_bytes is not None and self.mem_bytes < 1:
            raise ValueError(f"mem_bytes must be a positive int, got {self.mem_bytes!r}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        if self.method != "auto" and self.sized_by_content:
            if self.mem_bytes is None:
                raise ValueError(f"storage={self.storage!r} needs a budget in bytes (mem_bytes): its images have no fixed size")
            if self.max_size is not None:
                raise ValueError(f"give mem_bytes, not max_size, with storage={self.storage!r}")
        elif self.mem_bytes is None and (self.max_size is None or self.max_size < 1):
            raise ValueError(f"max_size must be a positive int (or give mem_bytes), got {self.max_size!r}")

    # ----------------------------------------------------------- derived
    @property
    def factor(self) -> int:
        """The held images' resolution divisor (``method_options['factor']``, 1 by default)."""
        return int(self.method_options.get("factor", 1))

    @property
    def bits(self) -> int:
        """Bits per grey level of uint8 storage (``method_options['bits']``, 8 by default)."""
        return int(self.method_options.get("bits", 8))

    @property
    def sized_by_content(self) -> bool:
        """The storage's images have no fixed size (JPEG): the image budget follows from the first experience."""
        return sized_by_content(self.storage)

    @property
    def identity(self) -> str:
        """Every field as canonical JSON: two configurations that differ in anything (e.g. ``iterations``) differ here."""
        return canonical_json(self)

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON object (what :meth:`from_json` reads back into an equal configuration)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BufferConfig":
        """The configuration :meth:`to_json` wrote; an unknown key is a ``ValueError`` naming it."""
        return cls(**checked_fields(cls, data))


#: Each field's type and whether ``None`` is refused.
_TYPES: dict[str, tuple[type, bool]] = {
    "max_size": (int, False), "mem_bytes": (int, False), "method": (str, True), "method_options": (dict, True),
    "recompress": (str, True), "storage": (str, True), "jpeg_quality": (int, True), "num_classes": (int, False),
    "seed": (int, True), "learner_aware": (bool, True), "soft_labels": (bool, True), "soft_temperature": (float, True),
    "augment": (bool, True), "logits": (bool, True), "core": (float, False), "fill": (str, True), "complement": (bool, True),
    "epochs": (int, True),
}


def sized_by_content(storage: str) -> bool:
    """Images held as ``storage`` have no fixed size (JPEG): the image budget follows from the first experience."""
    return codecs.for_storage(storage).image_nbytes((1, 1, 1)) is None


def config_from(config: BufferConfig | None, keywords: dict[str, Any]) -> BufferConfig:
    """``config``, or one built from the keyword arguments a buffer or plugin was given (the same checks either way);
    a keyword set beside ``config`` is a ``ValueError`` naming it, since one of the two would be ignored."""
    keywords = {k: ({} if k == "method_options" and v is None else v) for k, v in keywords.items()}
    if config is None:
        return BufferConfig(**keywords)
    if not isinstance(config, BufferConfig):
        raise TypeError(f"config must be a BufferConfig, got {type(config).__name__}")
    defaults = {f.name: f.default_factory() if callable(f.default_factory) else f.default for f in fields(BufferConfig)}
    given = sorted(k for k, v in keywords.items() if v != defaults[k] or type(v) is not type(defaults[k]))
    if given:
        raise ValueError(f"give config or the keyword options {given}, not both")
    return config


def resolve(config: BufferConfig, dataset_meta: dict[str, Any] | None) -> tuple[BufferConfig, int, dict[str, Any] | None]:
    """``config`` for the stream's dataset: ``method="auto"`` replaced by its choice (in :mod:`replaykit.memory_choice`,
    itself checked as a configuration), the image budget (``max_size``, or what ``mem_bytes`` holds) and the choice."""
    meta = dataset_meta or {}
    choice = None
    if config.method == "auto":
        from ..memory_choice import choose_memory

        if not meta.get("in_shape"):
            raise ValueError("method='auto' chooses by raw images per class: it needs dataset_meta with in_shape (dataset_info(name).meta())")
        choice = choose_memory(config.mem_bytes / config.num_classes, meta["in_shape"], config.epochs)
        config = replace(config, method=choice.method, method_options=dict(choice.method_options), core=choice.core, fill=choice.fill,
                         recompress=choice.recompress, storage=choice.storage, jpeg_quality=choice.jpeg_quality, logits=choice.logits,
                         learner_aware=config.learner_aware or choice.learner_aware)
    max_size = config.max_size
    if config.sized_by_content:
        max_size = 1  # set from the first experience's encoded sizes (see DistilledBuffer._fit_content_budget)
    elif config.mem_bytes is not None:
        in_shape = meta.get("in_shape")
        if not in_shape:
            raise ValueError("mem_bytes needs dataset_meta with the images' in_shape (dataset_info(name).meta())")
        fitting = images_for_bytes(config.mem_bytes, in_shape, factor=config.factor, storage=config.storage, bits=config.bits,
                                   soft_classes=config.num_classes if config.soft_labels else 0,
                                   logit_classes=config.num_classes if config.logits else 0)
        if max_size is not None and max_size != fitting:
            raise ValueError(f"give max_size or mem_bytes, not both: {config.mem_bytes} bytes hold {fitting} images, not {max_size}")
        if fitting < 1:
            raise ValueError(f"mem_bytes={config.mem_bytes} holds no image of shape {tuple(in_shape)} at {config.storage}")
        max_size = fitting
    if codecs.REGISTRY[config.storage].stores_pixels and not {"mean", "std"} <= set(meta):
        raise ValueError(f"storage={config.storage!r} needs dataset_meta with the dataset's mean and std (dataset_info(name).meta())")
    return config, max_size, None if choice is None else choice.to_json()


def check_execution(config: BufferConfig, workers: int | None, group: Any, distill_device: Any) -> str | None:
    """Check where the distillation runs against ``config``; return ``distill_device`` resolved (``None``: the strategy's)."""
    if (workers not in (None, 1) or group is not None) and config.learner_aware:
        raise ValueError("learner_aware distillation (asked for, or chosen by method='auto' for this budget) runs in this "
                         "process: it cannot be combined with workers or group")
    check_positive_int("workers", workers, allow_none=True)
    return None if distill_device is None else str(_resolve_device(distill_device))


def _resolve_device(device: Any) -> Any:
    """The package's ``resolve_device``, looked up there when called (so one swap, e.g. in a test, covers the package)."""
    from . import resolve_device

    return resolve_device(device)
