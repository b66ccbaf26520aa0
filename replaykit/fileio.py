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
    remove_stale_temporaries(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
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


def remove_stale_temporaries(path: PathLike) -> int:
    """Delete the temporary files that writers of ``path`` killed mid-write left behind (their process is gone);
    a live writer's file is kept. Readers never look at them; this only keeps them from piling up. Returns how
    many were removed."""
    target = Path(path)
    removed = 0
    try:
        candidates = list(target.parent.glob(f".{glob_escape(target.name)}.*.tmp"))
    except OSError:
        return 0
    for tmp in candidates:
        pid = tmp.name[len(target.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


class JSONFileError(ValueError):
    """A JSON document on disk that is unreadable, not what it should be, or fails its checksum."""


CHECKSUM_KEY = "sha256_of_document"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode("ascii")


def atomic_write_checked_json(path: PathLike, obj: dict[str, Any]) -> Path:
    """``atomic_write_json`` of a dict plus the sha256 of its canonical form, so that ``read_checked_json`` tells any
    change of content (a flipped digit is still valid JSON) from the document as written."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    return atomic_write_json(path, {**body, CHECKSUM_KEY: sha256_bytes(_canonical(body))})


def read_checked_json(path: PathLike, max_bytes: int = 1 << 30) -> dict[str, Any]:
    """Read a dict written by ``atomic_write_checked_json``: :class:`JSONFileError` unless it is exactly what was
    written. Documents without a checksum (written before it existed) are read as they are."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise JSONFileError(f"{path} has {size} bytes, more than the {max_bytes} a results document may have")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise JSONFileError(f"{path} is not valid UTF-8 JSON (truncated or corrupt?): {exc}") from exc
    if not isinstance(obj, dict):
        raise JSONFileError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    if CHECKSUM_KEY in obj:
        body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
        try:
            digest = sha256_bytes(_canonical(body))
        except (ValueError, RecursionError) as exc:
            raise JSONFileError(f"{path}: the document cannot be checked: {exc}") from exc
        if obj[CHECKSUM_KEY] != digest:
            raise JSONFileError(f"{path} does not match its checksum: modified or corrupted after it was written")
        return body
    import difflib  # only for documents without a checksum

    near = [k for k in obj if isinstance(k, str) and difflib.SequenceMatcher(None, k, CHECKSUM_KEY).ratio() >= 0.8]
    if near:
        # Documents written before the checksum existed are read as they are, but one whose checksum key itself was
        # damaged (a flipped bit in its name) is not such a document (found by fuzzing).
        raise JSONFileError(f"{path} has no {CHECKSUM_KEY!r} but a key {near[0]!r} like it: the document was damaged")
    return obj


def read_runs(path: PathLike, required: tuple[str, ...]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A benchmark's results document for ``--resume``: (document, its ``runs``), each run an object with the
    ``required`` keys; :class:`JSONFileError` otherwise, never a KeyError deep inside the benchmark."""
    doc = read_checked_json(path)
    runs = doc.get("runs")
    if not isinstance(runs, list) or not all(isinstance(r, dict) and all(k in r for k in required) for r in runs):
        raise JSONFileError(f"{path}: 'runs' must be a list of objects with the keys {list(required)}")
    return doc, runs


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))
