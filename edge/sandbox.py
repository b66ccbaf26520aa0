"""Device code as a phone runs it: ``block_torch()`` makes ``import torch`` fail in this process.

The device side of ReplayKit is numpy + onnxruntime (+ Pillow for JPEG) only; running it with torch
unimportable turns a hidden torch dependency into an ImportError instead of a surprise on the device.
The benchmarks' and tests' device processes call it first thing.
"""

from __future__ import annotations

import importlib.abc
import sys

__all__ = ["block_torch"]


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: D102 (importlib's protocol)
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this device process (edge.sandbox.block_torch)")
        return None


def block_torch() -> None:
    """Make every later ``import torch`` in this process raise ImportError (idempotent)."""
    if not any(isinstance(finder, _NoTorch) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NoTorch())
