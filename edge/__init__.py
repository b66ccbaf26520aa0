"""Edge bundles: export a model + replay buffer to ONNX, retrain on a device.

``import edge`` and :class:`Retrainer` need only numpy, onnxruntime, safetensors
and the standard library. :func:`export` imports torch when it is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bundle import FORMAT_VERSION, BundleError, read_manifest
from .memory import MemoryLimitError, current_rss_mb, peak_rss_mb
from .retrainer import Retrainer

__all__ = ["export", "verify_bundle", "Retrainer", "BundleError", "MemoryLimitError", "read_manifest",
           "peak_rss_mb", "current_rss_mb", "FORMAT_VERSION"]


def export(model: Any, buffer: Any, out_dir: str | Path, **options: Any) -> Path:
    """Write an ONNX bundle (see :func:`edge.exporter.export`; imports torch lazily)."""
    from .exporter import export as _export

    return _export(model, buffer, out_dir, **options)


def verify_bundle(model: Any, bundle_dir: str | Path, **options: Any) -> dict[str, float]:
    """Per-output max abs difference between a bundle's graphs and PyTorch (imports torch)."""
    from .exporter import verify_bundle as _verify

    return _verify(model, bundle_dir, **options)
