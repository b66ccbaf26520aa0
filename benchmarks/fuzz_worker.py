"""The fuzz half of ``benchmarks/faults.py``: mutations of valid files and a worker process that tries them.

A worker opens one target file format case after case in one process (no interpreter per case): each case's
mutation is drawn from ``(seed, case index)`` alone, so a worker that dies on a case (a crash in a native
parser) is restarted after it and the run is the same. Bundle files are tried in a torch-free process, as a
device opens them (``edge.sandbox.block_torch``): what a phone pays to open a bundle, not what a process that
also holds torch pays (its ``gc.collect`` in ``Retrainer.close`` alone took ~0.08 s CPU there).

Per case the worker writes ``{"i": ...}`` when it starts and a result line when it ends (one JSON line each,
unbuffered), with the wall and CPU seconds and the peak resident memory above the resident size before the
case (VmHWM, reset per case through /proc/self/clear_refs).

    python benchmarks/fuzz_worker.py JOB_JSON   # run by faults.py
"""

from __future__ import annotations

import json
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
_STATUS = Path("/proc/self/status")
HANG_SECONDS = 10.0

def _status_kb(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ mutations
def _safetensors_parts(data: bytes) -> tuple[dict, bytes] | None:
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    try:
        return json.loads(data[8: 8 + n]), data[8 + n:]
    except ValueError:
        return None


def _safetensors_bytes(header_text: bytes, body: bytes) -> bytes:
    header_text += b" " * ((8 - len(header_text) % 8) % 8)
    return struct.pack("<Q", len(header_text)) + header_text + body


def _header_edit(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """A structural edit of a safetensors header, re-serialised with a consistent length prefix."""
    parts = _safetensors_parts(data)
    if parts is None:
        return "bitflip", _bitflip(data, rng)
    header, body = parts
    names = [k for k in header if k != "__metadata__"]
    kind = ["huge_shape", "dtype", "swap", "rename", "offsets", "duplicate_key", "huge_string", "metadata_edit",
            "drop_tensor", "length_past_file", "length_huge"][int(rng.integers(11))]
    if kind in ("length_past_file", "length_huge"):
        n = len(data) + int(rng.integers(1, 1 << 20)) if kind == "length_past_file" else int(rng.integers(1 << 40, 1 << 63))
        return kind, struct.pack("<Q", n) + data[8:]
    if kind == "huge_shape" and names:
        name = names[int(rng.integers(len(names)))]
        header[name]["shape"] = [int(rng.choice([1 << 31, 1 << 40, 10**9])), int(rng.choice([1, 1 << 20]))]
    elif kind == "dtype" and names:
        header[names[int(rng.integers(len(names)))]]["dtype"] = str(rng.choice(["F64", "I64", "U8", "BF16", "F16", "BOOL", "X9"]))
    elif kind == "swap" and len(names) >= 2:
        a, b = rng.choice(len(names), 2, replace=False)
        header[names[a]], header[names[b]] = header[names[b]], header[names[a]]
    elif kind == "rename" and names:
        name = names[int(rng.integers(len(names)))]
        header[name + "_x" if rng.random() < 0.5 else "images" if name != "images" else "labels"] = header.pop(name)
    elif kind == "offsets" and names:
        entry = header[names[int(rng.integers(len(names)))]]
        entry["data_offsets"] = [int(v) + int(rng.integers(-64, 65)) for v in entry["data_offsets"]]
    elif kind == "duplicate_key" and names:
        text = json.dumps(header)
        name = names[int(rng.integers(len(names)))]
        dup = json.dumps({name: header[names[int(rng.integers(len(names)))]]})[1:-1]
        return kind, _safetensors_bytes(("{" + dup + ", " + text[1:]).encode(), body)
    elif kind == "huge_string":
        meta = header.setdefault("__metadata__", {})
        meta[str(rng.choice(["replaykit", "x"]))] = "A" * int(rng.choice([1 << 10, 1 << 16, 1 << 20]))
    elif kind == "metadata_edit" and isinstance(header.get("__metadata__"), dict):
        meta = header["__metadata__"]
        for key, value in list(meta.items()):
            try:
                inner = json.loads(value)
            except ValueError:
                continue
            if isinstance(inner, dict) and inner:
                inner_kind, inner = _json_edit(inner, rng)
                meta[key] = json.dumps(inner) if not isinstance(inner, str) else inner
                kind = f"metadata_{inner_kind}"
    elif kind == "drop_tensor" and names:
        header.pop(names[int(rng.integers(len(names)))])
    return kind, _safetensors_bytes(json.dumps(header).encode(), body)


def _json_edit(doc: Any, rng: np.random.Generator) -> tuple[str, Any]:
    """A valid-JSON change: a number, a string, a key dropped or added, a value replaced by another type."""
    doc = json.loads(json.dumps(doc))
    paths: list[list] = []

    def walk(node, path):
        if len(paths) > 5000:
            return
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node[:50]):
                walk(v, path + [i])

    walk(doc, [])
    path = paths[int(rng.integers(len(paths)))]
    if not path:
        return "replace_root", [doc] if rng.random() < 0.5 else "x"
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key, value = path[-1], parent[path[-1]]
    kind = ["number", "string", "drop", "type", "add", "huge"][int(rng.integers(6))]
    if kind == "number":
        parent[key] = (value + 1 if isinstance(value, int) and not isinstance(value, bool) else
                       value * (1 + 1e-6) if isinstance(value, float) else int(rng.integers(-2, 1 << 31)))
    elif kind == "string":
        parent[key] = (value[:-1] + "x" if isinstance(value, str) and value else "mnist")
    elif kind == "drop" and isinstance(parent, dict):
        parent.pop(key)
    elif kind == "drop" and isinstance(parent, list):
        parent.pop(key)
    elif kind == "type":
        parent[key] = [None, True, "1", 1.5, [], {}][int(rng.integers(6))]
    elif kind == "add" and isinstance(parent, dict):
        parent["zz_extra"] = 1
    elif kind == "add":
        parent.append(0)
    else:
        parent[key] = "B" * int(rng.choice([1 << 10, 1 << 20]))
    return kind, doc


def _bitflip(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    if not out:
        return bytes(out)
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(len(out)))
        out[i] ^= 1 << int(rng.integers(8))
    return bytes(out)


def mutate(data: bytes, fmt: str, rng: np.random.Generator) -> tuple[str, bytes]:
    """One mutation of a valid file of format ``fmt`` ('safetensors', 'json' or 'onnx')."""
    roll = rng.random()
    if roll < 0.3:
        return "bitflip", _bitflip(data, rng)
    if roll < 0.5:  # truncation at every length class: empty, inside the length prefix, the header, the body, the end
        n = len(data)
        cut = int(rng.choice([0, int(rng.integers(1, 9)), int(rng.integers(8, min(n, 4096) + 1)),
                              int(rng.integers(0, n + 1)), n - 1, n - int(rng.integers(1, 17))]))
        return "truncate", data[: max(0, min(n, cut))]
    if roll < 0.6:
        i = int(rng.integers(len(data) + 1))
        run = bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
        choice = rng.random()
        if choice < 0.34:
            return "overwrite", data[:i] + run + data[i + len(run):]
        if choice < 0.67:
            return "insert", data[:i] + run + data[i:]
        return "delete", data[:i] + data[i + len(run):]
    if roll < 0.65:
        return "append", data + bytes(rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8))
    if fmt == "safetensors":
        return _header_edit(data, rng)
    if fmt == "json":
        text = data.decode("utf-8")
        sub = rng.random()
        if sub < 0.1:
            return "whitespace", (" " + text.replace(": ", ":  ", 3) + "\n").encode()
        if sub < 0.2:
            return "duplicate_key", ("{" + '"format": "x", ' + text.lstrip()[1:]).encode()
        if sub < 0.25:
            depth = int(rng.choice([100, 10_000, 100_000]))
            return "deep_nesting", ("[" * depth + "]" * depth).encode()
        kind, doc = _json_edit(json.loads(text), rng)
        return f"json_{kind}", json.dumps(doc, indent=int(rng.integers(0, 3))).encode()
    return "bitflip", _bitflip(data, rng)  # onnx: bytes only (the checksum guards the parser)


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of case ``index``: each case is reproducible on its own (restarts after a crash)."""
    return np.random.default_rng([seed, index])


# ------------------------------------------------------------------ targets
class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):  # noqa: ARG001
    raise _Timeout()


def _bundle_snapshot(bundle: Path) -> dict[str, Any]:
    """What opening a bundle gives: manifest, parameters, momentum, decoded replay buffer, and what the two graphs
    compute (logits of a fixed probe, the parameters after one fixed step): equal snapshots are the same bundle."""
    import edge

    with edge.Retrainer(bundle, seed=0, threads=1) as r:
        probe = (np.arange(8 * int(np.prod(r.input_shape))) % 251).astype(np.uint8).reshape(8, *r.input_shape)
        snap = {"manifest": json.loads(json.dumps(r.manifest)), "x": r.buffer_x.copy(), "t": r.buffer_targets.copy(),
                "logits_held": None if r.buffer_logits is None else r.buffer_logits.copy(),
                "params": {k: v.copy() for k, v in r.params.items()}, "state": {k: v.copy() for k, v in r.state.items()},
                "probe_logits": r.logits(probe)}
        try:
            r.fit(probe, np.arange(8) % r.num_classes, batch_size=8, replay_batch_size=4)
            snap["stepped"] = {k: v.copy() for k, v in r.params.items()}
        except FloatingPointError:  # fit's named refusal of a diverging step: finite but changed parameters
            snap["stepped"] = {"diverged": np.zeros(1)}
    return snap


def _same_snapshot(a: dict, b: dict, ignore_files: bool = False) -> bool:
    def manifest(m):
        return {k: v for k, v in m.items() if k not in ("files", "manifest_sha256")} if ignore_files else m

    def arrays(x, y):
        return x.keys() == y.keys() and all(x[k].shape == y[k].shape and np.array_equal(x[k], y[k]) for k in x)

    held = (a["logits_held"] is None and b["logits_held"] is None) or (
        a["logits_held"] is not None and b["logits_held"] is not None and np.array_equal(a["logits_held"], b["logits_held"]))
    return (manifest(a["manifest"]) == manifest(b["manifest"]) and held
            and all(a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in ("x", "t", "probe_logits"))
            and all(arrays(a[k], b[k]) for k in ("params", "state", "stepped")))


def _resign(bundle: Path, name: str, pristine_manifest: dict[str, Any]) -> None:
    """Make the checksums agree with the mutated ``name``, as a forger would (sha256 is no signature): its size
    and sha256 in the manifest and the manifest's own checksum (a mutated manifest that is still a JSON object
    gets a fresh checksum). The mutated bytes then reach the parsers (safetensors, onnxruntime, the codecs, the
    manifest's field checks). Written in place, not atomically: the fuzz loop rewrites it every case."""
    from edge.bundle import MANIFEST, MANIFEST_CHECKSUM, _manifest_digest, file_entry

    if name == MANIFEST:
        try:
            manifest = json.loads((bundle / MANIFEST).read_bytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return
        if not isinstance(manifest, dict):
            return
    else:
        manifest = json.loads(json.dumps(pristine_manifest))
        manifest["files"][name] = file_entry(bundle / name)
    manifest[MANIFEST_CHECKSUM] = _manifest_digest(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def make_target(job: dict[str, Any]) -> tuple[Path, Callable[[], Any], Callable[[Any], bool], tuple, Callable[[], None]]:
    """(file to mutate, load, same-as-original, named errors, after-write hook) of a job."""
    kind, path = job["kind"], Path(job["path"])
    if kind == "buffer":
        from replaykit.buffer import BufferFormatError, SyntheticBuffer

        reference = SyntheticBuffer.load(path)

        def same(b) -> bool:
            import torch

            return (torch.equal(b.images, reference.images) and torch.equal(b.labels, reference.labels)
                    and torch.equal(b.class_ids, reference.class_ids) and b.num_classes == reference.num_classes
                    and b.meta == reference.meta and ((b.logits is None and reference.logits is None) or (
                        b.logits is not None and reference.logits is not None and torch.equal(b.logits, reference.logits))))

        return path, lambda: SyntheticBuffer.load(path), same, (BufferFormatError,), lambda: None
    if kind == "results":
        from replaykit.fileio import JSONFileError, read_runs

        keys = tuple(job["keys"])
        expected = read_runs(path, keys)
        return path, lambda: read_runs(path, keys), lambda d: d == expected, (JSONFileError,), lambda: None
    # a file of a bundle, opened as a device opens it
    from edge.sandbox import block_torch

    block_torch()
    from edge.bundle import MANIFEST, BundleError

    bundle = path.parent
    pristine_manifest = json.loads((bundle / MANIFEST).read_text())
    reference = _bundle_snapshot(bundle)
    resign = bool(job.get("resign"))
    after_write = (lambda: _resign(bundle, path.name, pristine_manifest)) if resign else (lambda: None)
    return (path, lambda: _bundle_snapshot(bundle), lambda s: _same_snapshot(s, reference, ignore_files=resign),
            (BundleError,), after_write)


def run_job(job: dict[str, Any], log) -> None:
    """Cases ``job["start"]`` .. ``job["stop"] - 1``; one JSON line per case start and end on ``log``."""
    path, load, same, named, after_write = make_target(job)
    original = path.read_bytes()
    manifest_path = path.parent / "manifest.json"
    original_manifest = manifest_path.read_bytes() if job.get("resign") else None
    can_reset = _reset_peak()
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for i in range(job["start"], job["stop"]):
            kind, data = mutate(original, job["fmt"], case_rng(job["seed"], i))
            path.write_bytes(data)
            after_write()
            log.write(json.dumps({"i": i}) + "\n")
            rss_before = _status_kb("VmRSS")
            _reset_peak()
            started, cpu = time.perf_counter(), time.process_time()
            signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
            error = None
            try:
                loaded = load()
                outcome = "identical" if same(loaded) else "accepted_changed" if job.get("resign") else "other"
                if outcome == "other":
                    error = "loaded different data"
                del loaded
            except named:
                outcome = "named_error"
            except _Timeout:
                outcome, error = "other", f"hang (> {HANG_SECONDS:g} s)"
            except Exception as exc:  # noqa: BLE001 - the figure counts exactly these
                outcome, error = "other", f"{type(exc).__name__}: {str(exc)[:300]}"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            peak = max(0, max(_status_kb("VmHWM"), _status_kb("VmRSS")) - rss_before) / 1024 if can_reset else -1.0
            row = {"i": i, "outcome": outcome, "mutation": kind, "seconds": round(seconds, 5), "cpu": round(cpu, 5),
                   "peak_mb": round(peak, 3), "bytes": len(data)}
            if error:
                row["error"] = error
            log.write(json.dumps(row) + "\n")
    finally:
        path.write_bytes(original)
        if original_manifest is not None:
            manifest_path.write_bytes(original_manifest)


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    sys.path.insert(0, str(REPO))
    with open(job["log"], "a", buffering=1) as log:
        run_job(job, log)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
