"""Crash-safe file writing and checksums.

This module imports nothing beyond the standard library so that the torch-free
device runtime (`edge`) can share it with the torch side.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

PathLike = str | os.PathLike

try:  # CPython's built-in SHA-256: hashlib would load OpenSSL, ~3.5 MB of resident memory on a device
    from _sha2 import sha256 as _new_sha256  # Python >= 3.12
except ImportError:
    try:
        from _sha256 import sha256 as _new_sha256  # Python 3.11
    except ImportError:
        from hashlib import sha256 as _new_sha256


def sha256_bytes(*chunks: bytes | memoryview) -> str:
    """Hex sha256 of the concatenation of ``chunks``."""
    digest = _new_sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: PathLike, block_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in blocks so big files stay cheap."""
    digest = _new_sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems refuse to open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` so that a crash leaves either the old file or the new one.

    ``write`` receives a temporary path in the same directory and must create the
    file there; it is then fsynced and renamed over ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_directory(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))
