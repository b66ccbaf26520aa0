"""On-device retraining with onnxruntime + numpy only (no torch in this process)."""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from replaykit.progress import progress_bar

from .bundle import (
    BUFFER, MODEL, PARAM_PREFIX, REPLAY, STATE_PREFIX, TRAIN_STEP, BundleError, load_tensors, open_parameters, read_manifest, save_state,
    step_session,
)
from .codec import (
    HELD_BYTES, LABEL_STORAGES, CodecError, ReplayImages, decoder_factor, dequantize_logits, read_replay_images, view_images,
)
from .memory import MemoryLimitError, current_rss_mb, peak_rss_mb, release_free_heap

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# Working memory of one onnxruntime call, planned as samples x bytes per activation float (of one sample's
# forward pass, see the manifest) + a fixed part (+ the parameter-sized arrays a training step holds). Measured
# on MNIST ConvNet-3 width 32 (VmHWM above the trimmed resident size before the call, fresh processes): a
# full-mode fit in micro-batches of 1 / 8 / 16 / 32 / 64 samples peaks 1.7 / 7.8 / 16.6 / 28.7 / 58.2 MB above
# it (planned: 3.6 / 11.6 / 20.6 / 38.8 / 75.0), a head-mode fit 3.5 / 13.3 / 26.0 MB at 8 / 32 / 64 (planned
# 7.4 / 22.3 / 42.0), inference in chunks of 16 6.7 MB (planned 12.4); the same for float32, float16 and int8
# weight storage (training is float32 whatever the storage). Rounded up.
_STEP_BYTES_PER_FLOAT = 11
_FORWARD_BYTES_PER_FLOAT = 6
_CALL_FIXED_MB = 2.5
# A training step also holds ~4 copies of the trainable parameters beside onnxruntime's memory (its outputs and
# their copies; in micro-batches: zero state, accumulated gradients, the update's temporaries).
_STEP_PARAM_COPIES = 4
_SAFETY_MB = 4.0
# Resident memory onnxruntime takes to open a bundle's two sessions beyond the files themselves: the first time in a
# process (kernel registries, thread pool, code pages) and any later time. Measured (MNIST ConvNet-3 width 32 full
# mode, 250 KB of files): +16.7 MB then +2.8 MB. Rounded down: a cap between estimate and truth still fails safe
# at the check after loading.
_OPEN_FIRST_MB = 12.0
_OPEN_FIXED_MB = 2.0
_SESSIONS_OPENED = False
# Run option that returns onnxruntime's arena memory to the system when a call ends: used on the last call of
# fit() and of inference, so that memory planned for one is free for the other (and for the caller's data).
_RELEASE_ARENA = ("memory.enable_memory_arena_shrinkage", "cpu:0")


def _session_options() -> ort.SessionOptions:
    """Session options that use one CPU arena for every Retrainer session of the process.

    Per-session arenas never hand back their first region (sized by the first call), so a step's
    working memory would stay resident beside inference's. The shared arena starts at 1 MB and
    every region beyond it is returned by ``_RELEASE_ARENA``.
    """
    global _ARENA_REGISTERED
    if not _ARENA_REGISTERED:
        memory_info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(memory_info, ort.OrtArenaCfg({"initial_chunk_size_bytes": 1 << 20}))
        _ARENA_REGISTERED = True
    options = ort.SessionOptions()
    options.add_session_config_entry("session.use_env_allocators", "1")
    return options


_ARENA_REGISTERED = False


class RetrainerClosedError(RuntimeError):
    """A Retrainer was used after ``close()`` (or after its ``with`` block ended)."""


class Retrainer:
    """Open a bundle, learn new samples mixed with its replay buffer, predict, save.

    Images are ``[N, C, H, W]`` arrays: ``uint8`` raw pixels (normalised here with
    the bundle's mean / std) or ``float32`` already normalised like the training
    data. Labels are integer classes below the bundle's ``num_classes`` (the
    exported classifier's output size: a bundle leaves room for new classes only
    if its model had spare outputs) or float32 probability rows ``[N, num_classes]``.

    ``memory_limit_mb`` caps the resident memory of the whole process: steps keep their
    size and run in micro-batches when needed; a cap that cannot be met raises
    :class:`MemoryLimitError`. The Retrainers of one process share one onnxruntime CPU
    arena, handed back to the system at the end of every ``fit`` and inference call.
    """

    def __init__(self, bundle_dir: str | os.PathLike, memory_limit_mb: float | None = None, seed: int = 0,
                 optimization: str = "all", threads: int | None = None, progress: bool = False) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.closed = False
        self.memory_limit_mb = memory_limit_mb
        self.progress = progress
        if memory_limit_mb is not None:
            if not memory_limit_mb > 0:
                raise ValueError(f"memory_limit_mb must be positive, got {memory_limit_mb}")
            self._check_memory("before opening the bundle")
        if optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimization must be one of {sorted(OPTIMIZATION_LEVELS)}, got {optimization!r}")
        self.manifest = read_manifest(self.bundle_dir)
        m = self.manifest
        self.input_shape = tuple(int(s) for s in m["input_shape"])
        self.num_classes = int(m["num_classes"])
        self.class_names = list(m.get("class_names", []))
        self.mode = m["mode"]
        self._mean = np.asarray(m["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        self._std = np.asarray(m["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        if memory_limit_mb is not None:
            self._check_open_fits()
        tensors = load_tensors(self.bundle_dir)
        self.params, self.state = open_parameters(self.bundle_dir, m, tensors)
        del tensors
        self._read_buffer()
        self.optimizer = dict(m["optimizer"])

        options = _session_options()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if memory_limit_mb is not None:
            # Micro-batches of varying size would make onnxruntime plan (and keep) one memory pattern per shape.
            options.enable_mem_pattern = False
        self._release = ort.RunOptions()
        self._release.add_run_config_entry(*_RELEASE_ARENA)
        try:
            self._infer = ort.InferenceSession(str(self.bundle_dir / MODEL), options, providers=["CPUExecutionProvider"])
            self._step = step_session(self.bundle_dir, m, self.params, options)
        except Exception as exc:  # onnxruntime raises its own error types for bad graphs
            raise BundleError(f"{self.bundle_dir}: onnxruntime cannot load the graphs (graph files that do not belong to "
                              f"this manifest?): {exc}") from exc
        global _SESSIONS_OPENED
        _SESSIONS_OPENED = True
        self._check_graphs()
        # Parameters the step graph takes as inputs (in head mode the frozen ones are constants inside it).
        self._step_params = [n for n in self.params if PARAM_PREFIX + n in self.manifest["train_step_inputs"]]
        self._rng = np.random.default_rng(seed)
        self.peak_rss_mb = current_rss_mb()
        self.planned_on_rss_mb: float | None = None  # trimmed resident size the last memory plan was made on
        if memory_limit_mb is not None:
            self._check_memory("after loading the bundle")

    # ------------------------------------------------------------ loading
    def _read_buffer(self) -> None:
        """Read ``replay.safetensors`` (the host buffer's own codes): the images as compact levels that each step
        decodes to normalised float32 (:class:`edge.codec.ReplayImages`), their target rows, and the held logits
        (``None`` when the host held none)."""
        m = self.manifest
        tensors = load_tensors(self.bundle_dir, REPLAY)
        replay = m["replay"]
        try:
            factor = decoder_factor(m["decoder"])
            if not isinstance(replay, dict) or replay.get("label_storage") not in LABEL_STORAGES:
                raise CodecError(f"the manifest's replay entry {replay!r} names no label storage of {LABEL_STORAGES}")
            stored = tuple(int(s) for s in m["buffer_image_shape"])
            decoded = (stored[0], stored[1] * factor, stored[2] * factor) if len(stored) == 3 else stored
            if decoded != self.input_shape:
                raise CodecError(f"buffer images {list(stored)} upsampled by {factor} give {list(decoded)}, "
                                 f"not the model's input {list(self.input_shape)}: decoder or shapes tampered with")
            images, labels = tensors.get("images"), tensors.get("labels")
            if images is None or labels is None:
                raise CodecError("the replay file lacks images or labels")
            count = int(labels.shape[0])
            if count != replay.get("count"):
                raise CodecError(f"the replay file holds {count} labels, the manifest says {replay.get('count')}")
            bits = replay.get("pixel_bits", 8)
            head = replay.get("jpeg_header_bytes", 0)
            if not isinstance(bits, int) or not isinstance(head, int):
                raise CodecError(f"pixel_bits {bits!r} / jpeg_header_bytes {head!r} must be ints")
            held = read_replay_images(images, m["image_storage"], stored, count, mean=self._mean, std=self._std,
                                      pixel_bits=bits, jpeg_header_bytes=head, factor=factor)
            del images, tensors["images"]
            self.buffer_targets = self._replay_targets(labels, tensors.get("class_ids"), replay["label_storage"], count)
            self.buffer_logits = None
            if replay.get("held_logits"):
                levels, scales = tensors.get("logits"), tensors.get("logit_scales")
                if levels is None or scales is None:
                    raise CodecError("the manifest says the buffer holds logits but the replay file lacks them")
                self.buffer_logits = dequantize_logits(levels, scales)
                if self.buffer_logits.shape != (count, self.num_classes) or not np.isfinite(self.buffer_logits).all():
                    raise CodecError(f"held logits {list(self.buffer_logits.shape)} are not finite [{count}, {self.num_classes}]")
            mix, weight = replay.get("mix", 0.0), replay.get("logit_loss_weight", 0.0)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (mix, weight)):
                raise CodecError(f"mix {mix!r} and logit_loss_weight {weight!r} must be numbers")
            self.mix, self.logit_loss_weight = float(mix), float(weight)
            if not (0.0 <= self.mix <= 1.0 and np.isfinite(self.logit_loss_weight) and self.logit_loss_weight >= 0):
                raise CodecError(f"mix {self.mix} must lie in [0, 1] and logit_loss_weight {self.logit_loss_weight} be >= 0")
            quality = replay.get("jpeg_quality")
            if m["image_storage"] == "jpeg" and not (isinstance(quality, int) and 1 <= quality <= 100):
                raise CodecError(f"jpeg_quality {quality!r} must be an int in [1, 100]")
        except CodecError as exc:
            raise BundleError(f"{self.bundle_dir}: {exc}") from exc
        self._view = dict(storage=m["image_storage"], factor=factor, quality=quality)
        self.buffer_images: ReplayImages | None = held

    @property
    def buffer_x(self) -> np.ndarray | None:
        """Every replay image as normalised float32 at the network's resolution (decoded on each access, for
        inspection: training decodes only the rows of each step)."""
        return None if self.buffer_images is None else self.buffer_images.all()

    def _replay_targets(self, labels: np.ndarray, class_ids: np.ndarray | None, storage: str, count: int) -> np.ndarray:
        """Target rows of the replayed images: one-hot for one-byte hard labels, else the stored soft rows."""
        if storage == "hard":
            if labels.dtype != np.uint8 or labels.shape != (count,) or (labels >= self.num_classes).any():
                raise CodecError(f"hard labels must be uint8 [{count}] below {self.num_classes}, got {labels.dtype}{list(labels.shape)}")
            return np.eye(self.num_classes, dtype=np.float32)[labels]
        if labels.dtype != np.dtype(storage) or labels.shape != (count, self.num_classes) or class_ids is None:
            raise CodecError(f"soft labels must be {storage} [{count}, {self.num_classes}] with class ids, got {labels.dtype}{list(labels.shape)}")
        rows = labels.astype(np.float32)
        if not np.isfinite(rows).all() or (rows < 0).any():
            raise CodecError("soft labels must be finite and non-negative")
        return rows

    def _check_graphs(self) -> None:
        step_inputs = [i.name for i in self._step.get_inputs()]
        step_outputs = [o.name for o in self._step.get_outputs()]
        if step_inputs != self.manifest["train_step_inputs"] or step_outputs != self.manifest["train_step_outputs"]:
            raise BundleError(f"{self.bundle_dir}: {TRAIN_STEP} does not have the inputs / outputs its manifest lists")
        infer_inputs = {i.name for i in self._infer.get_inputs()}
        if infer_inputs != {PARAM_PREFIX + n for n in self.params} | {"x"}:
            raise BundleError(f"{self.bundle_dir}: {MODEL} inputs do not match the bundle's parameters")

    def _run(self, session: Any, names: list[str], feed: dict[str, np.ndarray], options: Any) -> list[np.ndarray]:
        """``session.run``; a graph that fails on inputs this class has checked is a broken bundle: BundleError (a
        graph whose checksums were re-made after it was changed loaded, then failed in a Reshape, found by fuzzing)."""
        try:
            return session.run(names, feed, options)
        except (ValueError, ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                ort.capi.onnxruntime_pybind11_state.RuntimeException, ort.capi.onnxruntime_pybind11_state.NotImplemented) as exc:
            raise BundleError(f"{self.bundle_dir}: a graph of the bundle failed to run: {str(exc)[:500]}") from exc

    # ------------------------------------------------------------ input checks
    def _images(self, x: Any, what: str = "x") -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{what} must be a numpy array, got {type(x).__name__}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{what} must have shape [N, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{what} is empty")
        if x.dtype == np.uint8:
            return x
        if x.dtype != np.float32:
            raise ValueError(f"{what} must be uint8 pixels or float32 normalised images, got dtype {x.dtype}")
        if not np.isfinite(x).all():
            raise ValueError(f"{what} contains NaN or infinite values")
        return x

    def _normalised(self, x: np.ndarray) -> np.ndarray:
        if x.dtype == np.uint8:
            return ((x.astype(np.float32) / 255.0 - self._mean) / self._std).astype(np.float32)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _targets(self, y: Any, n: int) -> np.ndarray:
        y = np.asarray(y)
        if y.shape[:1] != (n,):
            raise ValueError(f"got {n} images but labels of shape {list(y.shape)}")
        if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
            return np.eye(self.num_classes, dtype=np.float32)[self._checked_classes(y)]
        if y.ndim == 2 and y.shape[1] == self.num_classes and np.issubdtype(y.dtype, np.floating):
            if not np.isfinite(y).all() or (y < 0).any() or not np.allclose(y.sum(1), 1.0, atol=1e-3):
                raise ValueError("soft labels must be finite, non-negative rows that sum to 1")
            return y.astype(np.float32)
        raise ValueError(f"labels must be integer classes [N] or float probability rows [N, {self.num_classes}], got "
                         f"{y.dtype}{list(y.shape)}")

    def _checked_classes(self, y: np.ndarray) -> np.ndarray:
        bad = y[(y < 0) | (y >= self.num_classes)]
        if bad.size:
            raise ValueError(
                f"labels {sorted(set(bad.tolist()))[:5]} are outside this bundle's classes 0..{self.num_classes - 1}; "
                "new classes need a model exported with spare outputs"
            )
        return y

    def _classes(self, y: Any, n: int) -> np.ndarray:
        """Class index per row: integer labels as given (checked), soft rows by their argmax."""
        y = np.asarray(y)
        if y.shape[:1] == (n,) and y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
            return self._checked_classes(y)
        return self._targets(y, n).argmax(axis=1)

    # ------------------------------------------------------------ memory
    def _check_memory(self, when: str) -> None:
        rss = current_rss_mb()
        self.peak_rss_mb = max(getattr(self, "peak_rss_mb", 0.0), rss)
        if self.memory_limit_mb is not None and rss > self.memory_limit_mb:
            raise MemoryLimitError(
                f"process resident memory is {rss:.1f} MB {when}, above memory_limit_mb={self.memory_limit_mb:g}; "
                "the cap cannot be met"
            )

    def _check_open_fits(self) -> None:
        """Refuse a cap below what opening this bundle takes, before anything is loaded, so that the process never
        passes the cap on the way to finding out: the files (read, decoded, copied into onnxruntime), the replay
        buffer as the Retrainer holds it (:meth:`_replay_held_mb`, x3 for the transients of decoding it), and
        onnxruntime's own setup (the first session of a process, measured ~14 MB on an MNIST ConvNet-3 full-mode
        bundle, later ones ~3 MB; see ``_OPEN_*_MB``)."""
        sizes = sum(int(self.manifest["files"][name]["size"]) for name in (MODEL, TRAIN_STEP, BUFFER, REPLAY)
                    if name in self.manifest["files"])
        need = (_OPEN_FIXED_MB if _SESSIONS_OPENED else _OPEN_FIRST_MB) + 3 * sizes / 2**20 + 3 * self._replay_held_mb()
        release_free_heap()
        held = current_rss_mb()
        if held + need + _SAFETY_MB > self.memory_limit_mb:
            raise MemoryLimitError(f"memory_limit_mb={self.memory_limit_mb:g} is below what opening {self.bundle_dir} "
                                   f"takes: the process holds {held:.1f} MB and the bundle needs ~{need:.1f} MB more "
                                   f"(+{_SAFETY_MB:g} MB margin); the cap cannot be met")

    def _replay_held_mb(self) -> float:
        """What an open Retrainer holds for its replay buffer, from the manifest: the images as compact levels
        (one byte per stored pixel for uint8 and JPEG, else the stored float width: never the float32 network
        input, which each step decodes for its own rows only) and float32 target / held-logit rows. A count that
        is not an int counts as 0 here; reading the buffer then refuses it."""
        m = self.manifest
        replay = m.get("replay")
        count = replay.get("count") if isinstance(replay, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return 0.0
        pixels = int(np.prod([int(s) for s in m["buffer_image_shape"]], dtype=np.int64))
        rows = 2 if replay.get("held_logits") else 1
        return count * (HELD_BYTES.get(m["image_storage"], 4) * pixels + rows * 4 * self.num_classes) / 2**20

    def _per_sample_mb(self, training: bool) -> float:
        floats = int(self.manifest["activation_floats_per_sample"])
        # Inference and head-mode steps keep forward values only; full mode also keeps their gradients.
        factor = _STEP_BYTES_PER_FLOAT if training and self.mode == "full" else _FORWARD_BYTES_PER_FLOAT
        return floats * factor / 2**20

    def _call_mb(self, samples: int, training: bool) -> float:
        """Planned working memory of one onnxruntime call on ``samples`` samples (see the constants above)."""
        fixed = _CALL_FIXED_MB
        if training:
            floats = sum(int(np.prod(self.manifest["params"][n], dtype=np.int64)) for n in self.manifest["trainable"])
            fixed += _STEP_PARAM_COPIES * 4 * floats / 2**20
        return samples * self._per_sample_mb(training) + fixed

    def _check_batch_fits(self, samples: int) -> None:
        """Refuse a step whose own input arrays (normalised float32 images and target rows, a few copies while a batch
        is assembled) would not fit under the cap, before any of them is allocated: micro-batching bounds onnxruntime's
        memory, not the batch the caller asked for."""
        if self.memory_limit_mb is None:
            return
        per_sample = 4 * (int(np.prod(self.input_shape)) + self.num_classes)
        need = 3 * samples * per_sample / 2**20
        release_free_heap()
        room = self.memory_limit_mb - current_rss_mb() - _SAFETY_MB - self._call_mb(1, True)
        if need > room:
            raise MemoryLimitError(f"a step of {samples} samples needs ~{need:.1f} MB for its inputs but "
                                   f"memory_limit_mb={self.memory_limit_mb:g} leaves {max(room, 0.0):.1f} MB; "
                                   "the cap cannot be met: lower batch_size / replay_batch_size")

    def plan_micro_batch(self, total: int) -> int:
        """Samples per onnxruntime call for a ``total``-sample step: all of them when the cap allows, else
        the largest micro-batch whose activations fit. The step itself is unchanged (gradients are
        accumulated over micro-batches), so a memory cap costs speed, never a different optimisation."""
        if self.memory_limit_mb is None:
            return total
        return min(total, self._fits(True, "a training step"))

    def _fits(self, training: bool, what: str) -> int:
        """Samples whose working memory fits under the cap, on top of what the process holds now.

        Measured: what the process holds is its resident size once free malloc memory is trimmed. Memory that
        onnxruntime keeps after a call (kernel buffers) is part of it and is not credited back: a later call
        does not reliably reuse it (a second full-mode fit in micro-batches of 32 peaked 21.2 MB above the
        12.5 MB the first one left, 33.7 MB above the first one's start, vs 28.7 MB for the first). The
        arena itself is handed back at the end of every fit and inference call (``_RELEASE_ARENA``), so an
        earlier call's working set must not be credited either: doing so let a fit planned right after an
        inference pass overshoot a 100 MB cap (100.4 MB)."""
        release_free_heap()
        self.planned_on_rss_mb = current_rss_mb()  # what the plan saw, so callers can check it exactly
        room = self.memory_limit_mb - self.planned_on_rss_mb - _SAFETY_MB
        per_sample = self._per_sample_mb(training)
        fits = int((room - self._call_mb(0, training)) // per_sample)
        if fits < 1:
            raise MemoryLimitError(
                f"memory_limit_mb={self.memory_limit_mb:g} leaves {room:.1f} MB but {what} on one sample needs "
                f"~{self._call_mb(1, training):.1f} MB; the cap cannot be met"
            )
        return fits

    def plan_inference_batch(self, batch_size: int | None) -> int:
        """Images per inference chunk: ``batch_size`` if given, else as many as the cap allows (at most 16:
        bigger chunks barely speed up a CPU but cost ~0.4 MB of activations per MNIST image)."""
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            return batch_size
        if self.memory_limit_mb is None:
            return 16
        return min(16, self._fits(False, "inference"))

    # ------------------------------------------------------------ training
    def _step_feed(self, x: np.ndarray, targets: np.ndarray, weights: tuple[np.ndarray, np.ndarray], state: dict[str, np.ndarray],
                   hyper: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {PARAM_PREFIX + n: self.params[n] for n in self._step_params}
        feed.update({STATE_PREFIX + n: v for n, v in state.items()})
        feed.update({"x": x, "targets": targets, "ce_weight": weights[0], "logit_weight": weights[1], **hyper})
        return feed

    def _hyper(self) -> dict[str, np.ndarray]:
        return {k: np.array(self.optimizer[k], dtype=np.float32) for k in ("lr", "momentum", "weight_decay")}

    def _run_step(self, x: np.ndarray, targets: np.ndarray, micro_batch: int, last: bool = False,
                  weights: tuple[np.ndarray, np.ndarray] | None = None) -> float:
        """One SGD step on the whole batch; in micro-batches when the memory plan asks for it.
        ``weights``: each row's (cross-entropy, logit-replay) weight, normalised over the whole step (default:
        the batch mean of the cross-entropy). ``last``: the final step of a fit, whose final call hands the
        arena's memory back."""
        if weights is None:
            weights = (np.full(len(x), 1.0 / len(x), dtype=np.float32), np.zeros(len(x), dtype=np.float32))
        trainable = self.manifest["trainable"]
        names_out = self.manifest["train_step_outputs"]
        if micro_batch >= len(x):
            outputs = self._run(self._step, names_out, self._step_feed(x, targets, weights, self.state, self._hyper()),
                                     self._release if last else None)
            loss = _finite_loss(outputs[0])
            # Copies: onnxruntime's outputs are views into its own memory, which they would keep alive.
            for name, value in zip(trainable, outputs[1: 1 + len(trainable)]):
                self.params[name] = value.copy()
            for name, value in zip(trainable, outputs[1 + len(trainable):]):
                self.state[name] = value.copy()
            return loss
        # With lr = momentum = weight_decay = 0 and zero state, the graph's new state is exactly the gradient
        # of the micro-batch's share of the step's loss (the row weights are normalised over the whole step);
        # the step's gradient is their sum (exact for these networks: no batch statistics). The update is then
        # torch.optim.SGD's rule, as in the graph.
        zeros = {k: np.zeros((), dtype=np.float32) for k in ("lr", "momentum", "weight_decay")}
        zero_state = {n: np.zeros_like(v) for n, v in self.state.items()}
        grads = {n: np.zeros_like(v) for n, v in self.state.items()}
        loss = 0.0
        for start in range(0, len(x), micro_batch):
            part = slice(start, start + micro_batch)
            final = last and start + micro_batch >= len(x)
            outputs = self._run(self._step, names_out, self._step_feed(x[part], targets[part], (weights[0][part], weights[1][part]),
                                                                zero_state, zeros), self._release if final else None)
            loss += _finite_loss(outputs[0])
            for name, grad in zip(trainable, outputs[1 + len(trainable):]):
                grads[name] += grad
            del outputs  # views into onnxruntime's memory: do not keep them alive through the next call
            if self.memory_limit_mb is not None:
                self._check_memory("during a training step")
        lr, momentum, weight_decay = (np.float32(self.optimizer[k]) for k in ("lr", "momentum", "weight_decay"))
        for name in trainable:
            velocity = momentum * self.state[name] + grads[name] + weight_decay * self.params[name]
            self.state[name] = velocity
            self.params[name] = self.params[name] - lr * velocity
        return loss

    def fit(self, x_new: np.ndarray, y_new: Any, epochs: int = 1, batch_size: int = 32,
            replay_batch_size: int | None = None, lr: float | None = None,
            micro_batch_size: int | None = None) -> dict[str, Any]:
        """Learn ``x_new`` / ``y_new``; each step mixes ``batch_size`` new samples with ``replay_batch_size``
        buffer samples (default: as many as new ones; 0 trains without replay).

        ``micro_batch_size`` caps the samples per onnxruntime call (gradient accumulation: the same step,
        less memory); by default the memory cap plans it, and the history's ``planned_on_rss_mb`` is the
        resident size that plan was made on (None without a cap)."""
        self._require_open()
        x_new = self._images(x_new, "x_new")
        targets = self._targets(y_new, x_new.shape[0])
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
        replay = batch_size if replay_batch_size is None else int(replay_batch_size)
        if replay < 0:
            raise ValueError(f"replay_batch_size must be >= 0, got {replay}")
        if replay and len(self.buffer_images) == 0:
            raise ValueError("this bundle's buffer is empty; pass replay_batch_size=0")
        if lr is not None and not (isinstance(lr, (int, float, np.floating)) and np.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.planned_on_rss_mb = None
        micro = self.plan_micro_batch(batch_size + replay + (replay if self._replays_logits() else 0))
        planned_on = self.planned_on_rss_mb
        self._check_batch_fits(min(batch_size, x_new.shape[0]) + replay)
        if micro_batch_size is not None:
            micro = min(micro, micro_batch_size)
        # Nothing has changed so far; from here a failure (a loss that turns NaN, a cap reached mid-step) puts the
        # parameters, momentum, optimizer and sampler back as they were: a failed fit is no fit.
        before = ({n: v for n, v in self.params.items()}, {n: v for n, v in self.state.items()}, dict(self.optimizer),
                  self._rng.bit_generator.state)
        try:
            if lr is not None:
                self.optimizer["lr"] = float(lr)
            return self._fit_steps(x_new, targets, epochs, batch_size, replay, micro, planned_on)
        except BaseException:
            self.params, self.state, self.optimizer = before[0], before[1], before[2]
            self._rng.bit_generator.state = before[3]
            raise

    def _fit_steps(self, x_new: np.ndarray, targets: np.ndarray, epochs: int, batch_size: int, replay: int, micro: int,
                   planned_on: float | None) -> dict[str, Any]:
        losses: list[float] = []
        step_seconds: list[float] = []
        steps = epochs * -(-x_new.shape[0] // batch_size)
        bar = progress_bar(total=steps, enabled=self.progress, desc="retrain", unit="step")
        for _ in range(epochs):
            order = self._rng.permutation(x_new.shape[0])
            for start in range(0, len(order), batch_size):
                idx = order[start: start + batch_size]
                xb, tb, wb = self._batch(x_new[idx], targets[idx], replay)
                started = time.perf_counter()
                losses.append(self._run_step(xb, tb, micro, last=len(losses) == steps - 1, weights=wb))
                step_seconds.append(time.perf_counter() - started)
                if self.memory_limit_mb is not None:
                    self._check_memory("during fit")
                bar.update(1)
        bar.close()
        if not all(np.isfinite(v).all() for v in self.params.values()):
            raise FloatingPointError("the parameters became NaN/inf during fit; lower the learning rate")
        self.peak_rss_mb = max(self.peak_rss_mb, current_rss_mb())
        return {"losses": losses, "steps": len(losses), "batch_size": batch_size, "replay_batch_size": replay,
                "micro_batch_size": micro, "step_seconds": step_seconds,
                "planned_on_rss_mb": planned_on}

    def _replays_logits(self) -> bool:
        return self.buffer_logits is not None and self.logit_loss_weight > 0

    def _batch(self, x_new: np.ndarray, targets: np.ndarray, replay: int
               ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """One step's rows, as the host's ``DistilledReplayPlugin`` builds them: the new samples and ``replay``
        buffer samples (cross-entropy, batch mean), a share ``mix`` of them shown through the buffer's codec
        (``edge.codec.view_images``: a lossy buffer's look is then no old-class cue), and, when the buffer holds
        logits, ``replay`` more buffer samples whose held logits are matched DER-style (weight
        ``logit_loss_weight`` on the mean squared error). Without replay the buffer plays no part."""
        xb, tb = self._normalised(x_new), targets
        if replay:
            pick = self._rng.choice(len(self.buffer_images), size=replay, replace=replay > len(self.buffer_images))
            xb = np.concatenate([xb, self.buffer_images.take(pick)])
            tb = np.concatenate([tb, self.buffer_targets[pick]])
            if self.mix > 0:
                shown = self._rng.random(len(xb)) < self.mix
                if shown.any():
                    xb[shown] = view_images(xb[shown], self._view["storage"], self._view["factor"], self._mean, self._std,
                                            self._view["quality"])
        rows = len(xb)
        ce_weight = np.full(rows, 1.0 / rows, dtype=np.float32)
        logit_weight = np.zeros(rows, dtype=np.float32)
        if replay and self._replays_logits():
            held = self._rng.choice(len(self.buffer_images), size=replay, replace=replay > len(self.buffer_images))
            xb = np.concatenate([xb, self.buffer_images.take(held)])
            tb = np.concatenate([tb, self.buffer_logits[held]])
            ce_weight = np.concatenate([ce_weight, np.zeros(replay, dtype=np.float32)])
            logit_weight = np.concatenate([logit_weight, np.full(replay, self.logit_loss_weight / (replay * self.num_classes),
                                                                 dtype=np.float32)])
        return np.ascontiguousarray(xb, dtype=np.float32), np.ascontiguousarray(tb, dtype=np.float32), (ce_weight, logit_weight)

    # ------------------------------------------------------------ inference
    def _logit_chunks(self, x: np.ndarray, batch_size: int | None):
        """``(start, logits)`` of ``x`` chunk by chunk, the chunk size planned once under the cap; the last call
        hands onnxruntime's arena back."""
        batch_size = self.plan_inference_batch(batch_size)
        feed = {PARAM_PREFIX + n: p for n, p in self.params.items()}
        for start in range(0, x.shape[0], batch_size):
            feed["x"] = self._normalised(x[start: start + batch_size])
            final = start + batch_size >= x.shape[0]
            out = self._run(self._infer, ["logits"], feed, self._release if final else None)[0].copy()
            if self.memory_limit_mb is not None:
                self._check_memory("during inference")
            yield start, out

    def logits(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        self._require_open()
        x = self._images(x)
        return np.concatenate([chunk for _, chunk in self._logit_chunks(x, batch_size)])

    def predict(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Predicted class index per image (int64)."""
        return self.logits(x, batch_size).argmax(axis=1).astype(np.int64)

    def evaluate(self, x: np.ndarray, y: Any, batch_size: int | None = None) -> float:
        """Top-1 accuracy in [0, 1] on integer labels (or the argmax of soft labels), counted chunk by chunk: nothing
        the size of the test set is allocated beyond the caller's arrays."""
        self._require_open()
        x = self._images(x)
        classes = self._classes(y, x.shape[0])
        correct = 0
        for start, chunk in self._logit_chunks(x, batch_size):
            correct += int((chunk.argmax(axis=1) == classes[start: start + len(chunk)]).sum())
        return correct / x.shape[0]

    def save(self) -> Path:
        """Write the trained parameters (float32: training is float32 whatever the bundle's weight storage)
        and the momentum into the bundle (crash-safe). Frozen parameters keep their stored bytes."""
        self._require_open()
        from .codec import SCALE_PREFIX

        tensors = load_tensors(self.bundle_dir)
        manifest = json.loads(json.dumps(self.manifest))
        for name in self.manifest["trainable"]:
            tensors.pop(SCALE_PREFIX + PARAM_PREFIX + name, None)
            tensors[PARAM_PREFIX + name] = self.params[name]
            tensors[STATE_PREFIX + name] = self.state[name]
            manifest["param_storage"][name] = "float32"
        manifest["optimizer_state"] = "stored"
        manifest["optimizer"] = dict(self.optimizer)
        self.manifest = save_state(self.bundle_dir, manifest, tensors)
        return self.bundle_dir

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the onnxruntime sessions, the parameters and the buffer, and hand freed memory back to the
        system, so that a long-lived device process can open bundle after bundle at a flat resident size.
        Idempotent; any later call but ``close`` / ``memory_report`` raises :class:`RetrainerClosedError`."""
        if self.closed:
            return
        self.closed = True
        self._infer = self._step = self._release = None
        self.params, self.state = {}, {}
        self.buffer_images = self.buffer_targets = self.buffer_logits = None
        gc.collect()  # sessions sit in reference cycles with their bindings: free them now, not at some later pass
        release_free_heap()

    def __enter__(self) -> "Retrainer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _require_open(self) -> None:
        if self.closed:
            raise RetrainerClosedError(f"this Retrainer of {self.bundle_dir} is closed; open the bundle again")

    def memory_report(self) -> dict[str, float]:
        """Peak resident memory of the whole process (VmHWM) and of this retrainer's lifetime (sampled)."""
        return {"process_peak_rss_mb": peak_rss_mb(), "sampled_peak_rss_mb": self.peak_rss_mb, "rss_mb": current_rss_mb()}


def _finite_loss(value: np.ndarray) -> float:
    loss = float(value)
    if not np.isfinite(loss):
        raise FloatingPointError("the training loss became NaN/inf; lower the learning rate")
    return loss
