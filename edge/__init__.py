"""Edge bundles: export a model + replay buffer to ONNX, retrain on a device.

``import edge`` and :class:`Retrainer` need only numpy, onnxruntime, safetensors
and the standard library. :func:`export` imports torch when it is called.

    edge.export(model, buffer, "bundle", mode="full", weights="int8")   # host, torch
    r = edge.Retrainer("bundle", memory_limit_mb=100)                    # device, no torch
    r.fit(x_new, y_new, epochs=2, batch_size=32)   # each step: 32 new + 32 replayed samples
    r.evaluate(x_test, y_test); r.save()

New classes: a device may learn any class below the exported classifier's
output size (``manifest["num_classes"]``), including classes absent from the
buffer (``manifest["buffer_classes"]``). To leave room for classes that do not
exist yet, export a model built with spare outputs; labels at or above the
output size are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bundle import FORMAT_VERSION, BundleError, read_manifest
from .memory import MemoryLimitError, current_rss_mb, peak_rss_mb
from .retrainer import Retrainer, RetrainerClosedError

__all__ = ["export", "verify_bundle", "Retrainer", "RetrainerClosedError", "BundleError", "MemoryLimitError", "read_manifest",
           "peak_rss_mb", "current_rss_mb", "FORMAT_VERSION"]


def export(model: Any, buffer: Any, out_dir: str | Path, **options: Any) -> Path:
    """Write an ONNX bundle (see :func:`edge.exporter.export`; imports torch lazily)."""
    from .exporter import export as _export

    return _export(model, buffer, out_dir, **options)


def verify_bundle(model: Any, bundle_dir: str | Path, **options: Any) -> dict[str, float]:
    """Per-output max abs difference between a bundle's graphs and PyTorch (imports torch)."""
    from .exporter import verify_bundle as _verify

    return _verify(model, bundle_dir, **options)
