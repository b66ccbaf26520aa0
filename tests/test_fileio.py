import json
import os

import pytest

from replaykit.fileio import atomic_write, atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_crash_during_write_keeps_previous_file(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"step": 1})

    def crash(tmp):
        tmp.write_bytes(b'{"step": 2, "partial')  # half-written, then the process "dies"
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        atomic_write(target, crash)
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_sha256_of_file_matches_bytes(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read blocks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == sha256_bytes(data)
    assert sha256_bytes(data[:10], data[10:]) == sha256_bytes(data)
    assert sha256_bytes(b"a") != sha256_bytes(b"b")


def test_fileio_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, replaykit.fileio; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
