"""Reliability in figures (issue 25): fuzzed files, kill -9 during writes, a long-lived device process, hostile inputs.

  * fuzz: every file a user may receive (a buffer file, a bundle's manifest, buffer.safetensors, model.onnx,
    train_step.onnx, a benchmark's results.json read by --resume), started from a valid file and mutated (bit flips,
    truncation at every length class, byte runs, safetensors header edits: huge shapes, swapped / renamed tensors,
    duplicate keys, huge strings, header lengths past the file; JSON edits). Each case must end in the project's
    named error or load exactly the original data; per case the time and the peak resident memory above the
    resident size before it (VmHWM, reset per case through /proc/self/clear_refs).
  * kill: a forked child writes (SyntheticBuffer.save, Retrainer.save, ``replaykit distill --out``, a checked
    results JSON) and the parent SIGKILLs it after a random delay; the file must then be the complete old or the
    complete new version; temporaries of killed writers must be gone after the next write.
  * rounds: open-fit-evaluate-save-close rounds of a full-mode MNIST bundle in one device process (torch blocked)
    under a 100 MB cap: resident size after each round.
  * hostile: bad device inputs in a device process under the cap: the error each raises, parameters and bundle
    bytes unchanged, VmHWM under the cap.

    python benchmarks/faults.py --quick     # CI smoke (tests/benchmarks/test_faults_quick.py)
    nice -n 19 python benchmarks/faults.py  # >= 10,000 cases per format, >= 200 kill trials per target
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import edge  # noqa: E402
from edge.bundle import BUFFER, MANIFEST, MODEL, TRAIN_STEP, BundleError  # noqa: E402
from replaykit.buffer import BufferFormatError, SyntheticBuffer  # noqa: E402
from replaykit.fileio import JSONFileError, atomic_write_checked_json, read_checked_json, read_runs  # noqa: E402

NAMED_ERRORS = (BufferFormatError, BundleError, JSONFileError)
CASE_LIMIT_SECONDS = 1.0
_STATUS = Path("/proc/self/status")


# ------------------------------------------------------------------ memory probes
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


# ------------------------------------------------------------------ fuzz targets
class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):  # noqa: ARG001
    raise _Timeout()


def _same_buffer(a: SyntheticBuffer, b: SyntheticBuffer) -> bool:
    return (torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.class_ids, b.class_ids)
            and a.num_classes == b.num_classes and a.meta == b.meta
            and ((a.logits is None and b.logits is None) or (a.logits is not None and b.logits is not None
                                                           and torch.equal(a.logits, b.logits))))


def _retrainer_snapshot(bundle: Path) -> dict[str, Any]:
    with edge.Retrainer(bundle) as r:
        return {"params": {k: v.copy() for k, v in r.params.items()}, "state": {k: v.copy() for k, v in r.state.items()},
                "x": r.buffer_x.copy(), "t": r.buffer_targets.copy(), "manifest": json.loads(json.dumps(r.manifest))}


def _same_snapshot(a: dict, b: dict) -> bool:
    return (a["manifest"] == b["manifest"] and np.array_equal(a["x"], b["x"]) and np.array_equal(a["t"], b["t"])
            and all(np.array_equal(a[k][n], b[k][n]) for k in ("params", "state") for n in a[k])
            and all(a[k].keys() == b[k].keys() for k in ("params", "state")))


def fuzz_target(name: str, path: Path, fmt: str, load: Callable[[], Any], same: Callable[[Any], bool], cases: int,
                seed: int) -> dict[str, Any]:
    """``cases`` mutations of the valid file at ``path``, each loaded with ``load``; the file is put back after each."""
    original = path.read_bytes()
    rng = np.random.default_rng(seed)
    counts = {"named_error": 0, "identical": 0, "other": 0}
    worst_seconds = worst_peak = 0.0
    others: list[dict[str, Any]] = []
    kinds: dict[str, int] = {}
    can_reset = _reset_peak()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for _ in range(cases):
            kind, data = mutate(original, fmt, rng)
            kinds[kind] = kinds.get(kind, 0) + 1
            path.write_bytes(data)
            rss_before = _status_kb("VmRSS")
            _reset_peak()
            started = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, 10.0)
            try:
                outcome = "identical" if same(load()) else "other"
                error = None if outcome == "identical" else "loaded different data"
            except NAMED_ERRORS:
                outcome, error = "named_error", None
            except _Timeout:
                outcome, error = "other", "hang (> 10 s)"
            except Exception as exc:  # noqa: BLE001 - the figure counts exactly these
                outcome, error = "other", f"{type(exc).__name__}: {str(exc)[:200]}"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            seconds = time.perf_counter() - started
            peak = (max(_status_kb("VmHWM"), _status_kb("VmRSS")) - rss_before) / 1024 if can_reset else float("nan")
            counts[outcome] += 1
            worst_seconds, worst_peak = max(worst_seconds, seconds), max(worst_peak, peak)
            if outcome == "other" and len(others) < 10:
                others.append({"mutation": kind, "error": error, "bytes": len(data)})
    finally:
        signal.signal(signal.SIGALRM, previous)
        path.write_bytes(original)
    return {"target": name, "cases": cases, **counts, "worst_seconds": worst_seconds, "worst_peak_mb": worst_peak,
            "file_bytes": len(original), "over_1s": None, "mutations": kinds, "other_examples": others}


def run_fuzz(work: Path, bundle: Path, cases: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    # 1. A buffer file as SyntheticBuffer.save writes it (uint8 storage, soft labels, held logits).
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(24, 1, 8, 8, generator=gen).clamp(-0.75, 1.75)
    labels = torch.softmax(torch.randn(24, 10, generator=gen), 1)
    buf = SyntheticBuffer(images, labels, 10, torch.arange(24) % 10, {"dataset": "digits", "mean": [0.3], "std": [0.4]})
    buf = buf.with_logits(torch.randn(24, 10, generator=gen))
    buffer_path = buf.save(work / "buffer.safetensors", storage="uint8")
    reference = SyntheticBuffer.load(buffer_path)
    rows.append(fuzz_target("buffer file (SyntheticBuffer.load)", buffer_path, "safetensors",
                            lambda: SyntheticBuffer.load(buffer_path), lambda b: _same_buffer(b, reference), cases, seed))
    # 2-5. The files of a bundle, opened by the device Retrainer.
    snapshot = _retrainer_snapshot(bundle)

    def open_bundle():
        return _retrainer_snapshot(bundle)

    same = lambda s: _same_snapshot(s, snapshot)  # noqa: E731
    for name, fmt in ((MANIFEST, "json"), (BUFFER, "safetensors"), (MODEL, "onnx"), (TRAIN_STEP, "onnx")):
        rows.append(fuzz_target(f"bundle {name} (edge.Retrainer)", bundle / name, fmt, open_bundle, same, cases, seed + 1))
    # 6. A benchmark's results document, as --resume reads it.
    results = work / "results.json"
    doc = {"config": {"seed": 0, "quick": False, "width": 32},
           "runs": [{"dataset": "mnist", "seed": s, "label": f"replay M={m}", "epochs": 1, "final_accuracy": 0.9 + s / 100,
                     "accuracy_matrix": [[0.99, 0.0], [0.95, 0.97]]} for s in range(3) for m in (100, 200)]}
    atomic_write_checked_json(results, doc)
    expected = read_runs(results, ("dataset", "seed", "label", "epochs"))
    rows.append(fuzz_target("results.json (--resume)", results, "json",
                            lambda: read_runs(results, ("dataset", "seed", "label", "epochs")), lambda d: d == expected,
                            cases, seed + 2))
    for row in rows:
        row["over_1s"] = row["worst_seconds"] > CASE_LIMIT_SECONDS
    return rows


# ------------------------------------------------------------------ kill -9
def _child(write: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # the child: write, then leave without running the parent's cleanup
        code = 0
        try:
            write()
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    return pid


def _wait(pid: int, limit: float = 120.0) -> int:
    """waitpid with a limit: a child stuck past it (e.g. a lock held at fork time) is killed; its wait status."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _write_seconds(write: Callable[[], None], restore: Callable[[], None], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        restore()
        started = time.perf_counter()
        status = _wait(_child(write))
        times.append(time.perf_counter() - started)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError("the write to be killed fails on its own (or hung)")
    return statistics.median(times)


def kill_target(name: str, trials: int, seed: int, write: Callable[[], None], restore: Callable[[], None],
                state: Callable[[], str], temporaries: Callable[[], list[Path]]) -> dict[str, Any]:
    """``trials`` times: restore the old version, fork a child that writes the new one, SIGKILL it after a delay drawn
    over the whole write (half of them over its last fifth, where the file is written); then ``state()`` must be
    'old' or 'new'."""
    rng = np.random.default_rng(seed)
    duration = _write_seconds(write, restore)
    outcomes = {"old": 0, "new": 0, "torn": 0}
    killed = 0
    examples: list[str] = []
    for k in range(trials):
        restore()
        delay = duration * (rng.uniform(0, 1.1) if k % 2 == 0 else rng.uniform(0.8, 1.1))
        pid = _child(write)
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(pid, 0)
        killed += os.WIFSIGNALED(status)
        try:
            seen = state()
        except Exception as exc:  # noqa: BLE001 - a file that does not load is torn
            seen = f"unreadable: {type(exc).__name__}: {exc}"
        if seen not in ("old", "new"):
            outcomes["torn"] += 1
            if len(examples) < 5:
                examples.append(seen[:300])
        else:
            outcomes[seen] += 1
    left = len(temporaries())
    restore()
    _wait(_child(write))  # the next (unkilled) write cleans up after the killed ones
    return {"target": name, "trials": trials, "torn": outcomes["torn"], "old": outcomes["old"], "new": outcomes["new"],
            "killed": killed, "write_seconds": duration, "temporaries_left_by_kills": left,
            "temporaries_after_next_write": len(temporaries()), "torn_examples": examples}


def run_kill(work: Path, bundle_src: Path, trials: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    folder = work / "kill"
    folder.mkdir(parents=True, exist_ok=True)
    tmps = lambda target: lambda: list(target.parent.glob(f".{target.name}.*.tmp"))  # noqa: E731

    # 1. SyntheticBuffer.save over an older buffer.
    gen = torch.Generator().manual_seed(seed)
    old = SyntheticBuffer(torch.randn(2000, 1, 8, 8, generator=gen), torch.arange(2000) % 10, 10)
    new = SyntheticBuffer(torch.randn(2000, 1, 8, 8, generator=gen), torch.arange(2000) % 10, 10)
    target = folder / "buffer.safetensors"
    old_bytes = old.save(target).read_bytes()

    def buffer_state() -> str:
        got = SyntheticBuffer.load(target)
        return "old" if _same_buffer(got, old) else "new" if _same_buffer(got, new) else "a third buffer"

    rows.append(kill_target("SyntheticBuffer.save", trials, seed, lambda: new.save(target),
                            lambda: target.write_bytes(old_bytes), buffer_state, tmps(target)))

    # 2. Retrainer.save of a trained retrainer over the exported bundle.
    bundle = folder / "bundle"
    shutil.copytree(bundle_src, bundle)
    pristine = {p.name: p.read_bytes() for p in bundle.iterdir()}
    r = edge.Retrainer(bundle, seed=seed)
    x = np.random.default_rng(seed).integers(0, 256, (64, *r.input_shape), dtype=np.uint8)
    r.fit(x, np.arange(64) % r.num_classes, batch_size=32)
    trained = {k: v.copy() for k, v in r.params.items()}
    before = _retrainer_snapshot(bundle)["params"]

    def restore_bundle() -> None:
        for p in bundle.iterdir():
            if p.name not in pristine:
                p.unlink()
        for n, data in pristine.items():
            (bundle / n).write_bytes(data)

    def bundle_state() -> str:
        params = _retrainer_snapshot(bundle)["params"]
        if all(np.array_equal(params[n], before[n]) for n in before):
            return "old"
        return "new" if all(np.array_equal(params[n], trained[n]) for n in trained) else "other parameters"

    rows.append(kill_target("Retrainer.save", trials, seed + 1, r.save, restore_bundle, bundle_state,
                            lambda: list(bundle.glob(".*.tmp")) + list(bundle.glob("*.pending"))))
    r.close()

    # 3. replaykit distill --out (the CLI's main in the child), over the buffer of another seed.
    from replaykit.cli import main as cli_main

    out = folder / "distilled.safetensors"
    argv = lambda s: ["distill", "--dataset", "digits", "--method", "random", "--ipc", "20", "--seed", str(s),  # noqa: E731
                      "--out", str(out), "--quiet"]
    with open(os.devnull, "w") as quiet:
        saved = sys.stdout
        sys.stdout = quiet
        try:
            cli_main(argv(1))
            new_cli = SyntheticBuffer.load(out)
            cli_main(argv(0))
        finally:
            sys.stdout = saved
    old_cli, old_cli_bytes = SyntheticBuffer.load(out), out.read_bytes()

    def cli_write() -> None:
        sys.stdout = open(os.devnull, "w")
        if cli_main(argv(1)) != 0:
            raise RuntimeError("distill failed")

    def same_content(a: SyntheticBuffer, b: SyntheticBuffer) -> bool:  # meta records each run's wall clock
        return torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.class_ids, b.class_ids)

    def cli_state() -> str:
        got = SyntheticBuffer.load(out)
        return "old" if same_content(got, old_cli) else "new" if same_content(got, new_cli) else "a third buffer"

    rows.append(kill_target("replaykit distill --out", trials, seed + 2, cli_write, lambda: out.write_bytes(old_cli_bytes),
                            cli_state, tmps(out)))

    # 4. A benchmark's results document (atomic_write_checked_json), ~1 MB.
    results = folder / "results.json"
    doc = lambda v: {"runs": [{"dataset": "mnist", "seed": i, "value": v, "pad": "x" * 200} for i in range(5000)]}  # noqa: E731
    atomic_write_checked_json(results, doc(0))
    old_json = results.read_bytes()

    def json_state() -> str:
        got = read_checked_json(results)
        return "old" if got == doc(0) else "new" if got == doc(1) else "a third document"

    rows.append(kill_target("results JSON (atomic_write_checked_json)", trials, seed + 3,
                            lambda: atomic_write_checked_json(results, doc(1)), lambda: results.write_bytes(old_json),
                            json_state, tmps(results)))
    return rows


# ------------------------------------------------------------------ device process: rounds and hostile inputs
DEVICE_SCRIPT = textwrap.dedent("""
    from edge.sandbox import block_torch
    block_torch()
    import gc, hashlib, json, sys
    from pathlib import Path
    import numpy as np
    import edge
    from edge.memory import current_rss_mb, release_free_heap
    job = json.loads(sys.argv[1])
    bundle, cap = Path(job["bundle"]), job["cap"]
    rng = np.random.default_rng(job["seed"])
    x = rng.integers(0, 256, (job["images"], 1, 28, 28), dtype=np.uint8)
    y = (np.arange(job["images"]) % 10).astype(np.int64)
    report = {"rss_before_mb": current_rss_mb()}
    if job["what"] == "rounds":
        rss = []
        for k in range(job["rounds"]):
            with edge.Retrainer(bundle, memory_limit_mb=cap, seed=k) as r:
                r.fit(x, y, epochs=1, batch_size=32)
                acc = r.evaluate(x, y)
                r.save()
            gc.collect(); release_free_heap()
            rss.append(current_rss_mb())
        report.update(rss_mb=rss, last_accuracy=acc)
    else:
        digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(bundle.iterdir())}
        disk = digest()
        nan = x[:16].astype(np.float32); nan[1, 0, 3, 3] = np.nan
        inf = x[:16].astype(np.float32); inf[0, 0, 0, 0] = np.inf
        cases = {
            "NaN image": lambda r: r.fit(nan, y[:16]), "inf image": lambda r: r.fit(inf, y[:16]),
            "float64 images": lambda r: r.fit(x[:16].astype(np.float64), y[:16]),
            "int32 images": lambda r: r.fit(x[:16].astype(np.int32), y[:16]),
            "wrong shape": lambda r: r.fit(np.zeros((4, 1, 27, 28), np.uint8), y[:4]),
            "3-d images": lambda r: r.fit(x[:4, 0], y[:4]),
            "label out of range": lambda r: r.fit(x[:16], np.full(16, 10)),
            "negative label": lambda r: r.fit(x[:16], np.full(16, -3)),
            "labels of another length": lambda r: r.fit(x[:16], y[:9]),
            "NaN soft labels": lambda r: r.fit(x[:16], np.full((16, 10), np.nan, np.float32)),
            "empty batch": lambda r: r.fit(x[:0], y[:0]),
            "batch far above the cap": lambda r: r.fit(x, y, batch_size=32, replay_batch_size=10_000_000),
            "diverging learning rate": lambda r: r.fit(x[:64], y[:64], lr=3e38),
            "evaluate NaN image": lambda r: r.evaluate(nan, y[:16]),
            "evaluate label out of range": lambda r: r.evaluate(x[:16], np.full(16, 99)),
            "evaluate empty batch": lambda r: r.evaluate(x[:0], y[:0]),
        }
        r = edge.Retrainer(bundle, memory_limit_mb=cap, seed=0)
        r.fit(x[:64], y[:64], batch_size=32)
        rows = []
        for name, call in cases.items():
            params = {k: v.copy() for k, v in r.params.items()}
            state = {k: v.copy() for k, v in r.state.items()}
            try:
                call(r)
                error = None
            except Exception as exc:
                error = type(exc).__name__
            unchanged = all(np.array_equal(params[k], r.params[k]) for k in params) and \\
                all(np.array_equal(state[k], r.state[k]) for k in state)
            rows.append({"input": name, "error": error, "state_unchanged": unchanged, "bundle_unchanged": digest() == disk,
                         "peak_rss_mb": edge.peak_rss_mb()})
        r.close()
        try:
            edge.Retrainer(bundle, memory_limit_mb=current_rss_mb() + 5)
            error = None
        except Exception as exc:
            error = type(exc).__name__
        rows.append({"input": "cap below what the bundle needs", "error": error, "state_unchanged": True,
                     "bundle_unchanged": digest() == disk, "peak_rss_mb": edge.peak_rss_mb()})
        report["cases"] = rows
    report["peak_rss_mb"] = edge.peak_rss_mb()
    report["torch_loaded"] = any(m.split(".")[0] == "torch" for m in sys.modules)
    print(json.dumps(report))
""")


def run_device(job: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, json.dumps(job)], capture_output=True, text=True,
                          env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"device process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ main
def _bundles(work: Path, seed: int, width: int) -> tuple[Path, Path]:
    """A tiny digits-sized bundle (the fuzz and kill targets) and a full-mode MNIST-sized one (rounds, hostile)."""
    from replaykit.networks import ConvNet

    torch.manual_seed(seed)
    small_buf = SyntheticBuffer(torch.randn(20, 1, 8, 8).clamp(-0.75, 1.75), torch.arange(20) % 8, 10,
                                meta={"dataset": "digits", "mean": [0.3], "std": [0.4]})
    small = edge.export(ConvNet((1, 8, 8), 10, width=4, depth=1).eval(), small_buf, work / "small_bundle", mode="full",
                        storage="uint8", overwrite=True, seed=seed)
    mnist_buf = SyntheticBuffer(torch.randn(100, 1, 28, 28).clamp(-0.4, 2.8), torch.arange(100) % 8, 10,
                                meta={"dataset": "mnist", "mean": [0.1307], "std": [0.3081]})
    mnist = edge.export(ConvNet((1, 28, 28), 10, width=width, depth=3).eval(), mnist_buf, work / "mnist_bundle",
                        mode="full", storage="uint8", overwrite=True, seed=seed)
    return small, mnist


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke: a few hundred fuzz cases, 20 kill trials, 4 rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=None, help="fuzz cases per format (default 10000; quick 200)")
    p.add_argument("--trials", type=int, default=None, help="kill trials per target (default 200; quick 10)")
    p.add_argument("--rounds", type=int, default=None, help="device retrain rounds (default 20; quick 4)")
    p.add_argument("--width", type=int, default=None, help="ConvNet width of the device bundle (default 32; quick 16)")
    p.add_argument("--memory-limit-mb", type=float, default=100.0)
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/faults.json; quick: runs/)")
    args = p.parse_args(argv)
    args.cases = args.cases or (200 if args.quick else 10_000)
    args.trials = args.trials or (10 if args.quick else 200)
    args.rounds = args.rounds or (4 if args.quick else 20)
    args.width = args.width or (16 if args.quick else 32)
    args.out = args.out or str(REPO / ("runs/faults_quick.json" if args.quick else "benchmarks/results/faults.json"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the kill trials fork: no OpenMP pool in the parent
    started, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="replaykit-faults-") as tmp:
        work = Path(tmp)
        small, mnist = _bundles(work, args.seed, args.width)
        print(f"bundles ready ({time.time() - started:.0f} s)", flush=True)
        fuzz = run_fuzz(work, small, args.cases, args.seed)
        for row in fuzz:
            print(f"fuzz {row['target']}: {row['cases']} cases, {row['named_error']} named errors, {row['identical']} "
                  f"identical, {row['other']} other, worst {row['worst_seconds'] * 1000:.1f} ms, "
                  f"{row['worst_peak_mb']:.2f} MB", flush=True)
        kill = run_kill(work, small, args.trials, args.seed)
        for row in kill:
            print(f"kill {row['target']}: {row['trials']} trials ({row['killed']} killed mid-run), old {row['old']}, "
                  f"new {row['new']}, torn {row['torn']}, temporaries left {row['temporaries_left_by_kills']} -> "
                  f"{row['temporaries_after_next_write']} after the next write", flush=True)
        rounds_bundle = work / "rounds_bundle"
        shutil.copytree(mnist, rounds_bundle)
        rounds = run_device({"what": "rounds", "bundle": str(rounds_bundle), "cap": args.memory_limit_mb,
                             "rounds": args.rounds, "images": 256, "seed": args.seed})
        rss = rounds["rss_mb"]
        rounds.update(rounds=args.rounds, width=args.width, cap_mb=args.memory_limit_mb,
                      drift_mb_round2_to_last=rss[-1] - rss[1] if len(rss) > 1 else 0.0)
        print(f"rounds: {args.rounds}, RSS after each {[round(v, 1) for v in rss]}, peak {rounds['peak_rss_mb']:.1f} MB",
              flush=True)
        hostile = run_device({"what": "hostile", "bundle": str(mnist), "cap": args.memory_limit_mb, "images": 256,
                              "seed": args.seed})
        for row in hostile["cases"]:
            print(f"hostile {row['input']}: {row['error']}, state unchanged {row['state_unchanged']}, bundle unchanged "
                  f"{row['bundle_unchanged']}, peak {row['peak_rss_mb']:.1f} MB", flush=True)
    doc = {"fuzz": fuzz, "kill": kill, "retrain_rounds": rounds, "hostile_inputs": hostile,
           "bugs_found": BUGS_FOUND, "args": vars(args), "seconds": time.time() - started,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_average_before_after": [list(load_before), list(os.getloadavg())],
           "machine_note": f"{os.cpu_count()}-CPU machine, no GPU"}
    atomic_write_checked_json(args.out, doc)
    print(f"wrote {args.out} in {doc['seconds']:.0f} s")
    return 0


#: What the fuzzing and fault runs of issue 25 found, and what fixed each (each has a regression test).
BUGS_FOUND = [
    {"what": "a buffer file's header (meta: mean / std, num_classes, storage) was covered by no checksum: an edited "
             "normalisation loaded as other pixels without an error",
     "fix": "header_sha256 over the header, checked on load (replaykit/buffer.py)",
     "test": "tests/test_buffer.py::test_header_edited_without_its_checksum_is_refused"},
    {"what": "a buffer header that is valid JSON but not an object raised AttributeError",
     "fix": "named BufferFormatError; any decoding failure of a checked file is a BufferFormatError",
     "test": "tests/test_buffer.py::test_header_that_is_not_an_object_is_a_format_error"},
    {"what": "SyntheticBuffer.load returned labels / class ids that were views of safetensors' memory map of the file: "
             "rewriting the file in place changed a buffer already loaded (the fuzzer's reference changed under it)",
     "fix": "load copies the tensors (replaykit/buffer.py)",
     "test": "tests/test_buffer.py::test_loaded_buffer_does_not_change_when_its_file_is_rewritten_in_place"},
    {"what": "a bundle manifest's fields (mean, optimizer, shapes) were covered by no checksum: an edited mean opened "
             "as a different model; a non-object 'files' raised AttributeError",
     "fix": "manifest_sha256 over the manifest and a checked 'files' map (edge/bundle.py)",
     "test": "tests/edge/test_retrainer.py::test_manifest_field_edited_without_its_checksum_is_refused"},
    {"what": "a results.json with one digit changed was resumed from as if original; a malformed one raised "
             "KeyError / TypeError / JSONDecodeError inside the benchmark",
     "fix": "document checksum (atomic_write_checked_json) and read_runs raising JSONFileError (replaykit/fileio.py)",
     "test": "tests/test_fileio.py::test_checked_json_refuses_a_flipped_digit_and_reads_legacy_documents"},
    {"what": "temporary files of writers killed mid-write piled up next to the target",
     "fix": "temporaries carry the writer's pid; the next write removes those of dead writers",
     "test": "tests/test_fileio.py::test_temporaries_of_dead_writers_are_removed_on_the_next_write"},
    {"what": "a fit that failed part-way (loss turned NaN at a huge lr) left the parameters changed, NaN included; "
             "an lr given to a fit that was then refused stayed set",
     "fix": "fit restores parameters, momentum, optimizer and sampler on any failure; non-finite parameters refused",
     "test": "tests/edge/test_retrainer.py::test_hostile_inputs_are_refused_before_anything_changes"},
    {"what": "a cap below what a bundle needs was found out only after loading it (VmHWM past the cap); a step far "
             "above the cap allocated its inputs before micro-batching could help",
     "fix": "both refused before allocating (edge/retrainer.py _check_open_fits, _check_batch_fits)",
     "test": "tests/edge/test_retrainer.py::test_hostile_sizes_are_refused_under_the_cap_without_passing_it"},
    {"what": "export's own check and verify_bundle compared multi-step trajectories with PyTorch: a ReLU tie on some "
             "CPU could fail an export and the suite",
     "fix": "each step from PyTorch's state, momentum compared too (edge/exporter.py verify_bundle)",
     "test": "tests/edge/test_export.py::test_train_steps_match_pytorch"},
]


if __name__ == "__main__":
    sys.exit(main())
