"""Class-incremental runs of PROTOCOL part A, shared by the demo, the benchmark and the tests.

One function builds the Avalanche stream (:func:`make_stream`), one the strategy
(:func:`make_strategy`), and :func:`run` trains it experience by experience,
evaluating on the whole test stream after each, and returns a :class:`RunResult`
(accuracy matrix, Avalanche's final stream accuracy and forgetting, distillation
seconds, memory). Every strategy is Avalanche's own; distilled replay is Naive
plus :class:`replaykit.avalanche.DistilledReplayPlugin`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .codecs import image_cost_bytes
from .data import dataset_info, load_tensors
from .device import resolve_device
from .networks import ConvNet
from .progress import progress_bar
from .typed import canonical_json, check_method_options, checked_fields, method_parameters
from .typed import check_type as _check_type

__all__ = [
    "KINDS",
    "StrategySpec",
    "RunConfig",
    "RunResult",
    "class_order",
    "make_stream",
    "make_strategy",
    "run",
    "forgetting",
    "parse_spec",
]

#: Strategy kinds :func:`make_strategy` builds.
KINDS = ("naive", "joint", "replay", "class-balanced", "herding", "gdumb", "der", "distilled", "downsample", "jpeg")
_NEEDS_MEMORY = {"replay", "class-balanced", "herding", "gdumb", "der", "distilled", "downsample", "jpeg"}
_BYTES_ONLY = {"downsample", "jpeg"}
#: Spec options each kind reads, with their type (``bool`` parses strictly from true/false/1/0).
OPTION_TYPES: dict[str, dict[str, type]] = {
    "distilled": {"learner_aware": bool, "mix": float, "soft": bool, "quality": int, "augment": bool, "logits": bool, "core": float, "fill": str,
                  "complement": bool, "alpha": float},
    "downsample": {"factor": int, "mix": float, "bits": int, "augment": bool},
    "jpeg": {"quality": int, "augment": bool, "mix": float},
}
#: GDumb retrains from scratch on its memory at every experience; it gets this many epochs on it
#: (M=100 at batch 128 is one step per epoch), not the stream's epochs.
GDUMB_EPOCHS = 250


def class_order(seed: int, num_classes: int = 10) -> list[int]:
    """PROTOCOL A's class order: natural for seed 0, else ``default_rng(seed).permutation``."""
    if seed == 0:
        return list(range(num_classes))
    return [int(c) for c in np.random.default_rng(seed).permutation(num_classes)]


@dataclass(frozen=True)
class StrategySpec:
    """What to run: a strategy ``kind`` with its memory budget (and method, for distilled replay).

    The budget is ``mem_size`` images or ``mem_bytes`` bytes (distilled and compressed replay).
    ``options``: ``factor`` / ``quality`` for compressed replay; for distilled replay
    ``learner_aware`` and ``logits`` (bools: the learner as a feature extractor; its logits held and
    replayed DER-style, with weight ``alpha``, DER's alpha, default 0.1) besides the method's own
    ``method_options``; ``augment`` (bool) for both: replayed images go through DSA's random transforms.
    """

    kind: str
    mem_size: int = 0
    method: str = "dm"
    method_options: dict[str, Any] = field(default_factory=dict)
    storage: str = "float32"  # distilled replay: precision the buffer's images are held at
    recompress: str = "distill"  # distilled replay: how held classes shrink ("distill" or "select")
    mem_bytes: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown strategy {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.kind in _BYTES_ONLY and self.mem_bytes < 1:
            raise ValueError(f"strategy {self.kind!r} needs a budget in bytes mem_bytes >= 1")
        if self.kind in _NEEDS_MEMORY - _BYTES_ONLY and self.mem_size < 1 and not (self.kind == "distilled" and self.mem_bytes > 0):
            raise ValueError(f"strategy {self.kind!r} needs a memory budget mem_size >= 1")
        types = OPTION_TYPES.get(self.kind, {})
        unknown = sorted(set(self.options) - set(types))
        if unknown:
            raise ValueError(f"options {unknown} mean nothing for strategy {self.kind!r}; it reads {sorted(types) or 'none'}")
        for key, value in self.options.items():
            _check_type(key, value, types[key])
        if self.kind == "distilled":
            check_method_options(self.method, self.method_options)
            alpha = self.options.get("alpha")
            if alpha is not None and not self.options.get("logits"):
                raise ValueError("option 'alpha' weights the held logits' replay: it needs logits=1")
            if alpha is not None and not 0 <= alpha < float("inf"):
                raise ValueError(f"option 'alpha' must be >= 0 and finite, got {alpha!r}")
        elif self.method_options:
            raise ValueError(f"method_options {sorted(self.method_options)} mean nothing for strategy {self.kind!r}")

    @property
    def identity(self) -> str:
        """Every field as canonical JSON: what ``--resume`` and the tables tell runs apart by.

        The :attr:`label` is for people and leaves options out (e.g. ``iterations``); two specs
        that differ in any field have different identities.
        """
        return canonical_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StrategySpec":
        """The spec :func:`dataclasses.asdict` (or :attr:`identity`) wrote; unknown keys are an error."""
        return cls(**checked_fields(cls, data))

    @property
    def label(self) -> str:
        budget = f"{self.mem_bytes}B" if self.mem_bytes else f"M={self.mem_size}"
        if self.kind == "distilled":
            extras = [self.storage] if self.storage != "float32" else []
            extras += [f"q{self.options['quality']}"] if self.storage == "jpeg" and "quality" in self.options else []
            extras += [f"{k}={v}" for k, v in sorted(self.method_options.items()) if k in ("bits", "factor", "init")]
            extras += ["learner"] if self.options.get("learner_aware") else []
            extras += ["soft"] if self.options.get("soft") else []
            extras += ["logits"] if self.options.get("logits") else []
            extras += [f"alpha={self.options['alpha']}"] if "alpha" in self.options else []
            extras += [f"mix={self.options['mix']}"] if "mix" in self.options else []
            extras += [f"core={self.options['core']}"] if "core" in self.options else []
            extras += [f"fill={self.options['fill']}"] if "fill" in self.options else []
            extras += ["complement"] if self.options.get("complement") else []
            extras += [f"recompress={self.recompress}"] if self.recompress != "distill" else []
            extras += ["aug"] if self.options.get("augment") else []
            return " ".join([f"distilled-{self.method} {budget}"] + extras)
        if self.kind == "downsample":
            mix = f" mix={self.options['mix']}" if self.options.get("mix") else ""
            bits = f" {self.options['bits']}bit" if self.options.get("bits", 8) != 8 else ""
            aug = " aug" if self.options.get("augment") else ""
            return f"downsample x{self.options.get('factor', 2)} {budget}{bits}{mix}{aug}"
        if self.kind == "jpeg":
            mix = f" mix={self.options['mix']}" if self.options.get("mix") else ""
            return f"jpeg q{self.options.get('quality', 50)} {budget}{mix}" + (" aug" if self.options.get("augment") else "")
        if self.kind in _NEEDS_MEMORY:
            return f"{self.kind} {budget}"
        return self.kind


def parse_spec(text: str) -> StrategySpec:
    """Text form of a :class:`StrategySpec`: ``kind[:budget][:method][:storage][:key=value...]``.

    The budget is a number of images (``replay:200``) or bytes (``downsample:78500B``).
    Examples: ``"naive"``, ``"replay:200"``, ``"jpeg:78500B:quality=50"``,
    ``"distilled:78500B:dm:uint8:factor=2:learner_aware=1:recompress=select:iterations=300"``.
    ``key=value`` pairs go to the spec's ``options`` (:data:`OPTION_TYPES` of the kind), its
    ``recompress``, or else (distilled replay) the method's constructor options, each parsed as
    the type of that argument's default. Booleans are true/false/1/0; an unknown key, a
    repeated key or a value of the wrong type is a ValueError naming it.
    """
    positional = [p for p in text.split(":") if "=" not in p]
    pairs: dict[str, str] = {}
    for part in text.split(":"):
        if "=" in part:
            key, value = part.split("=", 1)
            if key in pairs:
                raise ValueError(f"{text!r}: option {key!r} is given twice")
            pairs[key] = value
    if not positional or not positional[0]:
        raise ValueError(f"{text!r}: a spec starts with the strategy kind, one of {', '.join(KINDS)}")
    kind = positional[0]
    mem_size = mem_bytes = 0
    if len(positional) > 1:
        budget = positional[1]
        try:
            if budget.upper().endswith("B"):
                mem_bytes = int(budget[:-1])
            else:
                mem_size = int(budget)
        except ValueError:
            raise ValueError(f"{text!r}: budget {budget!r} is neither a number of images (200) nor of bytes (78500B)") from None
    if kind not in KINDS:
        raise ValueError(f"unknown strategy {kind!r}; choose from {', '.join(KINDS)}")
    if "recompress" in pairs and kind != "distilled":
        raise ValueError(f"{text!r}: option 'recompress' means nothing for strategy {kind!r}")
    recompress = pairs.pop("recompress", "distill")
    types = OPTION_TYPES.get(kind, {})
    options = {k: _parse_typed(k, pairs.pop(k), types[k]) for k in list(pairs) if k in types}
    if kind != "distilled":
        if len(positional) > 2:
            raise ValueError(f"{text!r}: unexpected fields {positional[2:]} (options are key=value)")
        if pairs:
            raise ValueError(f"{text!r}: options {sorted(pairs)} mean nothing for strategy {kind!r}; it reads {sorted(types) or 'none'}")
        return StrategySpec(kind, mem_size, mem_bytes=mem_bytes, options=options)
    method = positional[2] if len(positional) > 2 else "dm"
    storage = positional[3] if len(positional) > 3 else "float32"
    if len(positional) > 4:
        raise ValueError(f"{text!r}: unexpected fields {positional[4:]} after the storage (options are key=value)")
    params = method_parameters(method)
    unknown = sorted(set(pairs) - set(params))
    if unknown:
        raise ValueError(
            f"{text!r}: unknown option(s) {unknown} for distilled replay with method {method!r}; "
            f"spec options are {sorted(types)} and 'recompress', method options are {sorted(set(params) - set(types))}"
        )
    method_options = {k: _parse_typed(k, v, params[k]) for k, v in pairs.items()}
    return StrategySpec(kind, mem_size, method, method_options, storage=storage, recompress=recompress, mem_bytes=mem_bytes, options=options)


def _parse_typed(key: str, text: str, kind: type | None) -> Any:
    """``text`` as a ``kind`` (bool strictly from true/false/1/0), or a ValueError naming key and value."""
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise ValueError(f"option {key}={text!r} is not a boolean; write true/false or 1/0")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"option {key}={text!r} is not {'an int' if kind is int else 'a number'}") from None
    if kind is str:
        return text
    return _parse_value(text)


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass
class RunConfig:
    """Training settings shared by every strategy of a table (PROTOCOL A, with stated departures)."""

    dataset: str = "mnist"
    seed: int = 0
    epochs: int = 1
    width: int = 128
    depth: int = 3
    batch_size: int = 128
    batch_size_mem: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    train_per_class: int | None = None  # subsample the training set (tests, quick runs)
    test_per_class: int | None = None
    num_experiences: int = 5
    data_root: str | None = None
    validation: bool = False  # evaluate on 10 % of the training set held out (for tuning), never the test set
    device: str = "cpu"  # where the strategy trains and distills: cpu, cuda, cuda:N or auto (CUDA when present)


@dataclass
class RunResult:
    """Outcome of one strategy on one stream."""

    label: str
    kind: str
    mem_size: int
    method: str | None
    seed: int
    class_order: list[int]
    accuracy_matrix: list[list[float]]  # row i: after training experience i; column j: test experience j
    stream_accuracy: list[float]  # Avalanche's stream accuracy after each experience
    final_accuracy: float
    forgetting: float | None
    distill_seconds: list[float]
    train_seconds: float
    total_seconds: float
    memory_images: int
    memory_bytes: int
    buffer: Any = None  # the final SyntheticBuffer of distilled replay

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("buffer")
        return out


def _subsample(x: torch.Tensor, y: torch.Tensor, per_class: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if per_class is None:
        return x, y
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for cls in torch.unique(y):
        idx = torch.nonzero(y == cls).flatten()
        keep.append(idx[torch.randperm(idx.numel(), generator=gen)[:per_class]])
    index = torch.cat(keep).sort().values
    return x[index], y[index]


class _Tensors(torch.utils.data.TensorDataset):
    """Tensor dataset with the ``targets`` list Avalanche's benchmark builders read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(x, y)
        self.targets = y.tolist()


def make_stream(config: RunConfig):
    """Avalanche class-incremental benchmark of ``config.dataset`` in PROTOCOL A's class order.

    With ``config.validation`` the evaluation stream is a held-out tenth of the training set,
    so that settings can be chosen without looking at the test set.
    """
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark

    info = dataset_info(config.dataset)
    x, y = load_tensors(config.dataset, train=True, root=config.data_root)
    if config.validation:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(30_000 + config.seed))
        cut = len(y) // 10
        xt, yt, x, y = x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
    else:
        xt, yt = load_tensors(config.dataset, train=False, root=config.data_root)
    x, y = _subsample(x, y, config.train_per_class, 10_000 + config.seed)
    xt, yt = _subsample(xt, yt, config.test_per_class, 20_000 + config.seed)
    return class_incremental_benchmark(
        {"train": _Tensors(x, y), "test": _Tensors(xt, yt)},
        class_order=class_order(config.seed, info.num_classes),
        num_experiences=config.num_experiences,
    )


def make_strategy(spec: StrategySpec, config: RunConfig, *, progress: bool = False):
    """The Avalanche strategy of ``spec`` with a fresh ConvNet, SGD and an accuracy/forgetting evaluator."""
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
    from avalanche.training.storage_policy import ClassBalancedBuffer, HerdingSelectionStrategy, ParametricBuffer
    from avalanche.training.supervised import DER, GDumb, JointTraining, Naive

    from .avalanche import BufferConfig, DistilledReplayPlugin, MixedViewPlugin
    from .compressed import CompressedReplayBuffer

    info = dataset_info(config.dataset)
    device = resolve_device(config.device)  # ValueError naming a bad or missing device before anything is built
    torch.manual_seed(config.seed)
    model = ConvNet(info.in_shape, info.num_classes, width=config.width, depth=config.depth)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), forgetting_metrics(experience=True, stream=True), loggers=[]
    )
    common = dict(
        model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(), train_mb_size=config.batch_size,
        train_epochs=config.epochs, eval_mb_size=1024, device=device, evaluator=evaluator,
    )
    m, kind = spec.mem_size, spec.kind
    if kind == "naive":
        return Naive(**common)
    if kind == "joint":
        return JointTraining(**common)
    if kind == "gdumb":
        return GDumb(mem_size=m, **{**common, "train_epochs": GDUMB_EPOCHS})
    if kind == "der":
        # DER replays only once its buffer holds batch_size_mem images (drop_last), so cap it at M.
        return DER(mem_size=m, batch_size_mem=min(config.batch_size_mem, m), **common)
    if kind == "replay":
        plugin = ReplayPlugin(mem_size=m, batch_size_mem=config.batch_size_mem)
    elif kind == "class-balanced":
        plugin = ReplayPlugin(mem_size=m, batch_size_mem=config.batch_size_mem, storage_policy=ClassBalancedBuffer(m, adaptive_size=True))
    elif kind == "herding":
        policy = ParametricBuffer(m, groupby="class", selection_strategy=HerdingSelectionStrategy(model, "features"))
        plugin = ReplayPlugin(mem_size=m, batch_size_mem=config.batch_size_mem, storage_policy=policy)
    elif kind in _BYTES_ONLY:
        options = dict(spec.options)
        mix = float(options.pop("mix", 0.0))
        options["augment"] = bool(options.get("augment", False))
        policy = CompressedReplayBuffer(spec.mem_bytes, info.meta(), codec=kind, seed=config.seed, **options)
        plugins = [ReplayPlugin(mem_size=1, batch_size_mem=config.batch_size_mem, storage_policy=policy)]
        if mix > 0:  # the same mixed-view training distilled replay gets with a lossy buffer
            plugins.append(MixedViewPlugin(policy.view, mix, seed=config.seed))
        return Naive(plugins=plugins, **common)
    else:  # distilled
        buffer = BufferConfig(
            max_size=m or None, mem_bytes=spec.mem_bytes or None, method=spec.method, method_options=dict(spec.method_options),
            recompress=spec.recompress, storage=spec.storage, jpeg_quality=int(spec.options.get("quality", 50)),
            num_classes=info.num_classes, seed=config.seed, learner_aware=bool(spec.options.get("learner_aware", False)),
            soft_labels=bool(spec.options.get("soft", False)), augment=bool(spec.options.get("augment", False)),
            logits=bool(spec.options.get("logits", False)), core=spec.options.get("core"), fill=str(spec.options.get("fill", "random")),
            complement=bool(spec.options.get("complement", False)), epochs=config.epochs,
        )
        weight = {"logit_loss_weight": spec.options["alpha"]} if "alpha" in spec.options else {}  # else the plugin's default
        plugin = DistilledReplayPlugin(config=buffer, batch_size_mem=config.batch_size_mem, dataset_meta=info.meta(), progress=progress,
                                       mix=float(spec.options.get("mix", 0.5)), **weight)
    return Naive(plugins=[plugin], **common)


def forgetting(matrix: Sequence[Sequence[float]]) -> float | None:
    """Average forgetting: accuracy on each earlier experience right after learning it minus at the end."""
    if len(matrix) < 2:
        return None
    last = len(matrix) - 1
    return float(np.mean([matrix[j][j] - matrix[last][j] for j in range(last)]))


def _stored_images(strategy: Any, kind: str) -> tuple[int, Any]:
    for plugin in getattr(strategy, "plugins", []):
        policy = getattr(plugin, "storage_policy", None)
        if policy is not None:
            return len(policy.buffer), getattr(policy, "synthetic", policy if kind in _BYTES_ONLY else None)
    policy = getattr(strategy, "storage_policy", None)  # DER
    if policy is not None:
        return len(policy.buffer), None
    gdumb = [p for p in getattr(strategy, "plugins", []) if type(p).__name__ == "GDumbPlugin"]
    if gdumb:
        return sum(len(v) for v in gdumb[0].buffer.values()) if isinstance(gdumb[0].buffer, dict) else len(gdumb[0].buffer), None
    return 0, None


def run(spec: StrategySpec, config: RunConfig, benchmark=None, *, progress: bool = False) -> RunResult:
    """Train ``spec`` on the class-incremental stream and evaluate after every experience."""
    from avalanche.training.determinism.rng_manager import RNGManager

    benchmark = benchmark if benchmark is not None else make_stream(config)
    info = dataset_info(config.dataset)
    RNGManager.set_random_seeds(config.seed)
    start = time.perf_counter()
    strategy = make_strategy(spec, config, progress=progress)
    n = len(benchmark.train_stream)
    matrix: list[list[float]] = []
    stream_acc: list[float] = []
    train_seconds = 0.0

    def evaluate() -> None:
        results = strategy.eval(benchmark.test_stream)
        matrix.append([float(results[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"]) for j in range(n)])
        stream_acc.append(float(results["Top1_Acc_Stream/eval_phase/test_stream"]))

    if spec.kind == "joint":
        t0 = time.perf_counter()
        strategy.train(benchmark.train_stream)
        train_seconds += time.perf_counter() - t0
        evaluate()
    else:
        for exp in progress_bar(benchmark.train_stream, enabled=progress, desc=spec.label, leave=False):
            t0 = time.perf_counter()
            strategy.train(exp)
            train_seconds += time.perf_counter() - t0
            evaluate()
    images, synthetic = _stored_images(strategy, spec.kind)
    if spec.kind in _BYTES_ONLY:
        seconds, memory_bytes, synthetic = [], synthetic.nbytes(), None
    elif synthetic is not None:
        seconds = list(synthetic.meta.get("distill_seconds", []))
        memory_bytes = synthetic.nbytes(spec.storage)
    else:
        seconds = []
        memory_bytes = images * image_cost_bytes(info.in_shape)  # real images as uint8 pixels + a one-byte label
    if spec.kind == "der":
        memory_bytes += images * info.num_classes * 4  # DER also stores float32 logits
    return RunResult(
        label=spec.label, kind=spec.kind, mem_size=spec.mem_size, method=spec.method if spec.kind == "distilled" else None,
        seed=config.seed, class_order=class_order(config.seed, info.num_classes), accuracy_matrix=matrix,
        stream_accuracy=stream_acc, final_accuracy=stream_acc[-1], forgetting=forgetting(matrix),
        distill_seconds=seconds, train_seconds=round(train_seconds - sum(seconds), 3),
        total_seconds=round(time.perf_counter() - start, 3), memory_images=images, memory_bytes=int(memory_bytes),
        buffer=synthetic,
    )
