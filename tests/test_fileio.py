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


def test_checked_json_refuses_a_flipped_digit_and_reads_legacy_documents(tmp_path):
    """Regression (fuzzing, issue 25): a results file with one digit changed is still valid JSON and was resumed
    from as if it were the original."""
    from replaykit.fileio import JSONFileError, atomic_write_checked_json, read_checked_json, read_runs

    path = tmp_path / "results.json"
    doc = {"config": {"seed": 0}, "runs": [{"dataset": "mnist", "acc": 0.9812}]}
    atomic_write_checked_json(path, doc)
    assert read_checked_json(path) == doc
    path.write_text(path.read_text().replace("0.9812", "0.9813"))
    with pytest.raises(JSONFileError, match="checksum"):
        read_checked_json(path)
    path.write_text(json.dumps(doc))  # written before checksums existed: read as it is
    assert read_runs(path, ("dataset",)) == (doc, doc["runs"])
    with pytest.raises(JSONFileError, match="keys"):
        read_runs(path, ("seed",))
    for bad in (b"[1, 2]", b"\xff\xfe", b'{"runs": [1'):
        path.write_bytes(bad)
        with pytest.raises(JSONFileError):
            read_checked_json(path)


def test_a_damaged_checksum_key_is_not_read_as_a_legacy_document(tmp_path):
    """Regression (fuzzing, issue 25): one flipped bit in the name of the checksum key left a document with no
    checksum, which was read as a legacy document, damaged key and all."""
    from replaykit.fileio import CHECKSUM_KEY, JSONFileError, atomic_write_checked_json, read_checked_json, read_runs

    path = tmp_path / "results.json"
    atomic_write_checked_json(path, {"runs": [{"dataset": "mnist"}]})
    data = bytearray(path.read_bytes())
    at = data.index(CHECKSUM_KEY.encode()) + len(CHECKSUM_KEY) - 1  # "...documenu"
    data[at] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(JSONFileError, match="damaged"):
        read_runs(path, ("dataset",))
    path.write_text(json.dumps({"runs": [], "sha256_of_inputs": "x"}))  # an unrelated key of a legacy document
    assert read_checked_json(path) == {"runs": [], "sha256_of_inputs": "x"}


def test_temporaries_of_dead_writers_are_removed_on_the_next_write(tmp_path):
    target = tmp_path / "out.json"
    dead = tmp_path / ".out.json.999999999.abc.tmp"  # no such pid
    dead.write_text("half")
    mine = tmp_path / f".out.json.{os.getpid()}.def.tmp"  # a live writer's: kept
    mine.write_text("in progress")
    atomic_write_json(target, {"a": 1})
    assert not dead.exists() and mine.exists() and json.loads(target.read_text()) == {"a": 1}
