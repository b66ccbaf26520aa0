"""ReplayKit: continual learning with distilled replay.

Submodules are imported lazily so that ``import replaykit`` stays cheap and the
torch-free pieces (``replaykit.fileio``) can be used by the device runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SyntheticBuffer": ("replaykit.buffer", "SyntheticBuffer"),
    "BufferFormatError": ("replaykit.buffer", "BufferFormatError"),
    "load_tensors": ("replaykit.data", "load_tensors"),
    "dataset_info": ("replaykit.data", "dataset_info"),
    "make_network": ("replaykit.networks", "make_network"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'replaykit' has no attribute {name!r}")
