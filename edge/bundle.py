"""The on-disk bundle: file names, manifest, checksums and crash-safe parameter saves.

Torch-free on purpose: the device reads and rewrites bundles with numpy,
onnxruntime, safetensors and the standard library only.

A bundle is a folder::

    model.onnx          inference graph, every parameter a graph input
    train_step.onnx     one SGD-with-momentum step as a pure function (head mode: the
                        frozen feature extractor is a set of constants whose values the
                        runtime supplies from buffer.safetensors, see ``step_session``)
    buffer.safetensors  parameters (float32, float16 or int8 + scales, see ``edge.codec``)
                        and, once saved, the momentum
    replay.safetensors  the replay buffer as the host holds it: its own image codes (JPEG
                        bodies after one shared header, packed grey levels, uint8, float16,
                        at the stored resolution), one byte per hard label (or soft rows +
                        class ids) and the held logits (int8 + float16 row scales): the
                        host's ``buffer.nbytes()`` plus the safetensors header
    manifest.json       format version, shapes, normalisation, classes, mode, weight and
                        image storage, image decoder, size and sha256 of every other file

Every parameter is stored once. Momentum is zero when a bundle is exported and is not
stored until the device saves (``manifest["optimizer_state"]``: ``"zero"`` / ``"stored"``).

``save`` commits new parameters with a small journal so that a crash at any
point leaves a bundle that opens with either the old or the new parameters.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from replaykit.fileio import atomic_write, atomic_write_json, sha256_bytes, sha256_file

FORMAT_VERSION = 3
MANIFEST = "manifest.json"
MODEL = "model.onnx"
TRAIN_STEP = "train_step.onnx"
BUFFER = "buffer.safetensors"
REPLAY = "replay.safetensors"
BUNDLE_FILES = (MODEL, TRAIN_STEP, BUFFER, REPLAY)
PENDING = ".pending"  # suffix of the journal files written by ``save_state``
MANIFEST_CHECKSUM = "manifest_sha256"
MAX_MANIFEST_BYTES = 16 << 20

PARAM_PREFIX = "param."
STATE_PREFIX = "state."
MODES = ("head", "full")
STORAGES = ("uint8", "float16", "float32", "jpeg")  # replay image storage, see edge.codec
OPTIMIZER_STATES = ("zero", "stored")
# External-data location of the head-mode step graph's frozen parameters: a file that never exists, so
# onnxruntime refuses the graph unless the runtime supplies the values (``step_session``).
FROZEN_LOCATION = "frozen-parameters-supplied-by-the-runtime"


class BundleError(ValueError):
    """A bundle that is missing, tampered with, truncated or inconsistent."""


def file_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def recover(bundle_dir: Path) -> None:
    """Finish or discard an interrupted ``save_state`` (see module docstring)."""
    new_manifest = bundle_dir / (MANIFEST + PENDING)
    new_buffer = bundle_dir / (BUFFER + PENDING)
    if new_manifest.exists() and not new_buffer.exists():
        # The buffer was already swapped in; the pending manifest describes it.
        os.replace(new_manifest, bundle_dir / MANIFEST)
    else:
        # Crash before the commit started: the old files are untouched.
        new_manifest.unlink(missing_ok=True)
        new_buffer.unlink(missing_ok=True)


def read_manifest(bundle_dir: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Load ``manifest.json`` and check that every listed file has its recorded size and sha256."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise FileNotFoundError(f"no bundle folder at {bundle_dir}")
    recover(bundle_dir)
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir} has no {MANIFEST}; it is not an edge bundle")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} has {path.stat().st_size} bytes; a manifest has at most {MAX_MANIFEST_BYTES}")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{path} is not valid JSON (truncated or corrupt?): {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "replaykit-edge-bundle":
        raise BundleError(f"{path} is not a ReplayKit edge bundle manifest")
    # The manifest's own checksum: the file checksums below guard the other files, this one guards the fields
    # (shapes, normalisation, optimizer) that decide what they mean. It is required: reading manifests without one
    # as written before it existed let a damaged checksum key (a flipped bit in its name, a deleted stretch) carry
    # other damage in unchecked (found by fuzzing).
    if MANIFEST_CHECKSUM not in manifest:
        raise BundleError(f"{path} has no {MANIFEST_CHECKSUM!r}: damaged, or exported before manifests were "
                          "checksummed (export the bundle again)")
    if manifest[MANIFEST_CHECKSUM] != _manifest_digest(manifest):
        raise BundleError(f"{path} does not match its own checksum: the manifest was modified or corrupted")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: format version {manifest.get('format_version')!r}; this runtime reads {FORMAT_VERSION}")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or set(files) - set(BUNDLE_FILES) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str) for e in files.values()):
        raise BundleError(f"{path}: 'files' must map {list(BUNDLE_FILES)} to their size and sha256")
    missing = [name for name in BUNDLE_FILES if name not in files]
    if missing:
        raise BundleError(f"{path} does not list {missing}")
    for key in ("input_shape", "num_classes", "mode", "mean", "std", "params", "trainable", "image_storage",
                "weight_storage", "param_storage", "optimizer_state", "buffer_image_shape", "decoder", "replay",
                "frozen", "optimizer", "train_step_inputs", "train_step_outputs", "activation_floats_per_sample"):
        if key not in manifest:
            raise BundleError(f"{path} lacks the field {key!r}")
    check_fields(manifest, str(path))
    if verify:
        for name, entry in files.items():
            file = bundle_dir / name
            if not file.is_file():
                raise BundleError(f"bundle file {file} is missing")
            size = file.stat().st_size
            if size != entry["size"]:
                raise BundleError(
                    f"{file} has {size} bytes, the manifest says {entry['size']}: truncated or replaced"
                )
            if sha256_file(file) != entry["sha256"]:
                raise BundleError(f"{file} does not match its sha256 in the manifest: the file was modified or corrupted")
    return manifest


def _ints(value: Any, least: int = 0) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= least for v in value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_fields(manifest: dict[str, Any], where: str) -> None:
    """The types and ranges of the fields the runtime reads, so that a manifest whose checksum passes but whose
    fields do not make sense (a buggy writer, or a forger: sha256 is no signature) is a :class:`BundleError` here,
    not a TypeError or KeyError deep inside opening it (found by fuzzing re-checksummed manifests). The files'
    own consistency with these fields is checked where they are read (``edge.codec``, ``Retrainer._check_graphs``)."""
    m = manifest
    params, trainable, frozen = m["params"], m["trainable"], m["frozen"]
    problems = []
    if not (_ints(m["input_shape"], 1) and len(m["input_shape"]) == 3):
        problems.append("input_shape must be three positive ints")
    if not (isinstance(m["num_classes"], int) and not isinstance(m["num_classes"], bool) and m["num_classes"] >= 1):
        problems.append("num_classes must be a positive int")
    if m["mode"] not in MODES:
        problems.append(f"mode must be one of {MODES}")
    channels = m["input_shape"][0] if not problems else None
    for key in ("mean", "std"):
        if not (isinstance(m[key], list) and m[key] and all(_number(v) for v in m[key]) and len(m[key]) == channels):
            problems.append(f"{key} must be one finite number per input channel")
    if isinstance(m["std"], list) and not all(_number(v) and v > 0 for v in m["std"]):
        problems.append("std must be positive")
    if not (isinstance(params, dict) and params and all(isinstance(k, str) and _ints(v) for k, v in params.items())):
        problems.append("params must map names to shapes (lists of ints >= 0)")
    for key, names in (("trainable", trainable), ("frozen", frozen)):
        if not (isinstance(names, list) and all(isinstance(n, str) and isinstance(params, dict) and n in params
                                                 for n in names) and len(set(names)) == len(names)):
            problems.append(f"{key} must list distinct names of params")
    if not (isinstance(m["param_storage"], dict) and isinstance(params, dict) and set(m["param_storage"]) == set(params)):
        problems.append("param_storage must name the storage of every parameter")
    if m["image_storage"] not in STORAGES:
        problems.append(f"image storage {m['image_storage']!r} is not one of {STORAGES}")
    if not (_ints(m["buffer_image_shape"], 1) and m["buffer_image_shape"]):
        problems.append("buffer_image_shape must be positive ints")
    optimizer = m["optimizer"]
    if not (isinstance(optimizer, dict) and all(_number(optimizer.get(k)) and optimizer[k] >= 0
                                                for k in ("lr", "momentum", "weight_decay"))):
        problems.append("optimizer must give finite lr, momentum and weight_decay >= 0")
    for key in ("train_step_inputs", "train_step_outputs"):
        if not (isinstance(m[key], list) and all(isinstance(n, str) for n in m[key])):
            problems.append(f"{key} must be a list of names")
    if not problems and (set(trainable) & set(frozen) or set(trainable) | set(frozen) != set(params)):
        problems.append("trainable and frozen must split params")
    if not problems:  # the step graph's state inputs and outputs follow trainable, in its order (outputs are zipped)
        if [n for n in m["train_step_inputs"] if n.startswith(STATE_PREFIX)] != [STATE_PREFIX + n for n in trainable]:
            problems.append("train_step_inputs must hold the momentum of every trainable parameter, in order")
        if m["train_step_outputs"] != ["loss"] + [f"new.{p}{n}" for p in (PARAM_PREFIX, STATE_PREFIX) for n in trainable]:
            problems.append("train_step_outputs must be the loss, then the new parameters and momentum of trainable")
    if not (isinstance(m["activation_floats_per_sample"], int) and m["activation_floats_per_sample"] >= 1):
        problems.append("activation_floats_per_sample must be a positive int")
    if not isinstance(m["replay"], dict):
        problems.append("replay must be an object")
    if not isinstance(m.get("class_names", []), list):
        problems.append("class_names must be a list")
    if problems:
        raise BundleError(f"{where}: {'; '.join(problems)}")


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest`` atomically with its own checksum; returns what was written."""
    manifest = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}
    manifest[MANIFEST_CHECKSUM] = _manifest_digest(manifest)
    atomic_write_json(path, manifest)
    return manifest


def load_tensors(bundle_dir: Path, name: str = BUFFER) -> dict[str, np.ndarray]:
    """The tensors of ``buffer.safetensors`` (parameters) or, with ``name=REPLAY``, of the replay buffer."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(bundle_dir / name))
    except Exception as exc:  # safetensors raises its own types for bad headers
        raise BundleError(f"{bundle_dir / name} is not readable safetensors: {exc}") from exc


def open_parameters(bundle_dir: Path, manifest: dict[str, Any], tensors: dict[str, np.ndarray]
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The float32 parameters (dequantized from their storage) and momentum of a bundle."""
    from .codec import CodecError, decode_parameters

    try:
        params = decode_parameters(tensors, manifest["params"], manifest["param_storage"], PARAM_PREFIX, str(bundle_dir))
    except CodecError as exc:
        raise BundleError(str(exc)) from exc
    bad = [n for n, v in params.items() if not np.isfinite(v).all()]
    if bad:
        raise BundleError(f"{bundle_dir}: parameters {bad[:3]} hold NaN or infinite values")
    if manifest["optimizer_state"] not in OPTIMIZER_STATES:
        raise BundleError(f"{bundle_dir}: optimizer_state {manifest['optimizer_state']!r} is not one of {OPTIMIZER_STATES}")
    stored = [n for n in manifest["trainable"] if STATE_PREFIX + n in tensors]
    if manifest["optimizer_state"] == "zero":
        if stored:
            raise BundleError(f"{bundle_dir}: the manifest says the momentum is zero but the buffer file stores it")
        return params, {n: np.zeros_like(params[n]) for n in manifest["trainable"]}
    state = {}
    for name in manifest["trainable"]:
        array = tensors.get(STATE_PREFIX + name)
        if array is None or array.shape != params[name].shape or array.dtype != np.float32 or not np.isfinite(array).all():
            raise BundleError(f"{bundle_dir}: optimizer state for {name!r} is missing, mis-shaped or not finite")
        state[name] = array
    return params, state


def write_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(arrays, str(tmp)))


def save_state(bundle_dir: Path, manifest: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """Replace the parameters in ``buffer.safetensors`` and the manifest as one commit.

    Order: write both new files under ``*.pending`` (fsynced), delete nothing yet;
    swap the buffer in, then the manifest. ``recover`` (run on every open) rolls a
    half-done swap forward and throws away a half-written journal.
    """
    new_buffer = bundle_dir / (BUFFER + PENDING)
    new_manifest_path = bundle_dir / (MANIFEST + PENDING)
    write_tensors(new_buffer, tensors)
    manifest = json.loads(json.dumps(manifest))
    manifest["files"][BUFFER] = file_entry(new_buffer)
    manifest["saves"] = int(manifest.get("saves", 0)) + 1
    manifest = write_manifest(new_manifest_path, manifest)
    os.replace(new_buffer, bundle_dir / BUFFER)
    os.replace(new_manifest_path, bundle_dir / MANIFEST)
    return manifest


def step_session(bundle_dir: Path, manifest: dict[str, Any], params: dict[str, np.ndarray], options: Any = None):
    """An onnxruntime session of ``train_step.onnx`` with the frozen parameters supplied as its constants.

    Head mode keeps the frozen feature extractor out of the graph's inputs so that onnxruntime can
    pre-pack it once; its values live only in ``buffer.safetensors`` and are handed over here as
    external initializers (dequantized float32). The arrays stay referenced by the session."""
    import onnxruntime as ort

    options = ort.SessionOptions() if options is None else options
    inputs = set(manifest["train_step_inputs"])
    constants = {PARAM_PREFIX + n: np.ascontiguousarray(params[n], dtype=np.float32)
                 for n in manifest["frozen"] if PARAM_PREFIX + n not in inputs}
    if constants:
        options.add_external_initializers(list(constants), [ort.OrtValue.ortvalue_from_numpy(v) for v in constants.values()])
    session = ort.InferenceSession(str(bundle_dir / TRAIN_STEP), options, providers=["CPUExecutionProvider"])
    session.frozen_constants = constants  # keep the memory onnxruntime was given alive
    return session
