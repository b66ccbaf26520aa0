"""Reliability in figures: fuzzed files, kill -9 during writes, a long-lived device process, hostile inputs.

  * fuzz: every file a user may receive (a buffer file; a bundle's manifest, buffer.safetensors, replay.safetensors,
    model.onnx, train_step.onnx; a benchmark's results.json read by --resume), started from a valid file and mutated
    (bit flips, truncation at every length class, byte runs, safetensors header edits: huge shapes, swapped / renamed
    tensors, duplicate keys, huge strings, header lengths past the file; JSON edits). Each case must end in the
    project's named error or load exactly the original data ("other" otherwise: another exception, a crash, a hang,
    different data). Cases run many per worker process (``benchmarks/fuzz_worker.py``; bundles in a torch-free one,
    as a device opens them); per case the wall and CPU seconds and the peak resident memory above the resident size
    before it (VmHWM, reset per case). Bundle files are fuzzed twice: as received (the manifest's checksums as the
    exporter wrote them) and re-checksummed, as a forger would (sha256 is no signature), so that the mutated bytes
    reach safetensors, onnxruntime, the codecs and the manifest's field checks; there a load of changed data is
    "accepted_changed", not "other".
  * kill: a forked child writes (SyntheticBuffer.save, Retrainer.save, ``replaykit distill --out``, a checked
    results JSON) and is SIGKILLed at a Python call / return event drawn over its whole run or over the write itself
    (chosen independently of the machine's load), or by the parent after a delay over the write's last fifth (inside
    C calls); the file must then be the complete old or the complete new version; temporaries of killed writers must
    be gone after the next write.
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
from edge.bundle import BUFFER, MANIFEST, MODEL, REPLAY, TRAIN_STEP, read_manifest, load_tensors, open_parameters  # noqa: E402
from replaykit.buffer import SyntheticBuffer  # noqa: E402
from replaykit.fileio import atomic_write_checked_json, read_checked_json, read_runs  # noqa: E402

CASE_LIMIT_SECONDS = 1.0


# ------------------------------------------------------------------ fuzz
def _fuzz_rows(log: Path) -> tuple[dict[int, dict], set[int]]:
    done, started = {}, set()
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by a worker that died while writing it
                continue
            (done.__setitem__(row["i"], row) if "outcome" in row else started.add(row["i"]))
    return done, started


def fuzz_cases(name: str, job: dict[str, Any], cases: int, work: Path, stall_seconds: float = 120.0) -> dict[str, Any]:
    """``cases`` mutations of ``job["path"]`` tried by worker processes (``benchmarks/fuzz_worker.py``), many cases
    per process. A worker that dies on a case (a native crash) or stops making progress for ``stall_seconds``
    (a hang the worker's own 10 s alarm cannot break) is killed, the case counted as "other", and a new worker goes
    on after it."""
    log = work / f"fuzz_{len(list(work.glob('fuzz_*.jsonl')))}.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    failures: dict[int, str] = {}
    start = 0
    while start < cases:
        spec = {**job, "start": start, "stop": cases, "log": str(log)}
        proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "fuzz_worker.py"), json.dumps(spec)],
                                env=env, stderr=subprocess.PIPE, text=True)
        size, moved = -1, time.monotonic()
        while proc.poll() is None:
            time.sleep(0.5)
            now_size = log.stat().st_size if log.exists() else 0
            if now_size != size:
                size, moved = now_size, time.monotonic()
            elif time.monotonic() - moved > stall_seconds:
                proc.kill()
                proc.wait()
                break
        stderr = proc.stderr.read() if proc.stderr else ""
        done, started = _fuzz_rows(log)
        if proc.returncode == 0 and len(done) >= cases:
            break
        pending = sorted(i for i in started if i not in done)
        if not pending:
            raise RuntimeError(f"fuzz worker for {name} failed before its first case:\n{stderr[-3000:]}")
        failures[pending[0]] = (f"worker died (exit status {proc.returncode})" if proc.returncode not in (None, -9)
                                else f"no progress for {stall_seconds:g} s (hang)") + f": {stderr.strip()[-300:]}"
        start = pending[0] + 1
    done, _ = _fuzz_rows(log)
    rows = [done[i] for i in range(cases) if i in done]
    counts = {"named_error": 0, "identical": 0, "other": 0}
    if job.get("resign"):
        counts["accepted_changed"] = 0
    kinds: dict[str, int] = {}
    others = []
    for row in rows:
        counts[row["outcome"]] += 1
        kinds[row["mutation"]] = kinds.get(row["mutation"], 0) + 1
        if row["outcome"] == "other" and len(others) < 10:
            others.append({k: row[k] for k in ("i", "mutation", "error", "bytes")})
    counts["other"] += len(failures)
    others += [{"i": i, "mutation": "?", "error": e} for i, e in failures.items()][: max(0, 10 - len(others))]
    slowest = max(rows, key=lambda r: r["seconds"])
    return {"target": name, "cases": len(rows) + len(failures), **counts,
            "worst_seconds": slowest["seconds"], "worst_cpu_seconds": max(r["cpu"] for r in rows),
            "worst_peak_mb": max(r["peak_mb"] for r in rows), "over_1s": sum(r["seconds"] > CASE_LIMIT_SECONDS for r in rows),
            "mean_seconds": sum(r["seconds"] for r in rows) / len(rows), "slowest_case": slowest,
            "file_bytes": len(Path(job["path"]).read_bytes()), "resigned": bool(job.get("resign")),
            "mutations": kinds, "other_examples": others, "worker_restarts": len(failures)}


def run_fuzz(work: Path, bundle: Path, cases: int, resigned_cases: int, seed: int, only: str | None = None
             ) -> list[dict[str, Any]]:
    """The fuzz rows (``only``: just those whose target names contain it)."""
    rows = []

    def row(name: str, job: dict[str, Any], n: int) -> None:
        if only and only not in name:
            return
        started = time.time()
        rows.append(fuzz_cases(name, {**job, "seed": seed}, n, work))
        r = rows[-1]
        extra = f", {r['accepted_changed']} accepted changed" if "accepted_changed" in r else ""
        print(f"fuzz {name}: {r['cases']} cases, {r['named_error']} named errors, {r['identical']} identical{extra}, "
              f"{r['other']} other, worst {r['worst_seconds'] * 1000:.1f} ms (cpu {r['worst_cpu_seconds'] * 1000:.1f} ms), "
              f"peak {r['worst_peak_mb']:.2f} MB ({time.time() - started:.0f} s)", flush=True)

    # 1. A buffer file as SyntheticBuffer.save writes it (uint8 storage, soft labels, held logits).
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(24, 1, 8, 8, generator=gen).clamp(-0.75, 1.75)
    labels = torch.softmax(torch.randn(24, 10, generator=gen), 1)
    buf = SyntheticBuffer(images, labels, 10, torch.arange(24) % 10, {"dataset": "digits", "mean": [0.3], "std": [0.4]})
    buf = buf.with_logits(torch.randn(24, 10, generator=gen))
    buffer_path = buf.save(work / "buffer.safetensors", storage="uint8")
    row("buffer file (SyntheticBuffer.load)", {"kind": "buffer", "path": str(buffer_path), "fmt": "safetensors"}, cases)
    # 2-6. The files of a bundle, opened by the device Retrainer in a torch-free process: as received (checksums as
    # the exporter wrote them), then re-checksummed by a forger so that the mutated bytes reach the parsers.
    formats = {MANIFEST: "json", BUFFER: "safetensors", REPLAY: "safetensors", MODEL: "onnx", TRAIN_STEP: "onnx"}
    for resign, n in ((False, cases), (True, resigned_cases)):
        if n <= 0:
            continue
        for name, fmt in formats.items():
            copy = work / f"bundle_{name.split('.')[0]}_{int(resign)}"
            shutil.copytree(bundle, copy)
            label = f"bundle {name} (edge.Retrainer{', re-checksummed' if resign else ''})"
            row(label, {"kind": "bundle", "path": str(copy / name), "fmt": fmt, "resign": resign}, n)
    # 7. A benchmark's results document, as --resume reads it.
    results = work / "results.json"
    doc = {"config": {"seed": 0, "quick": False, "width": 32},
           "runs": [{"dataset": "mnist", "seed": s, "label": f"replay M={m}", "epochs": 1, "final_accuracy": 0.9 + s / 100,
                     "accuracy_matrix": [[0.99, 0.0], [0.95, 0.97]]} for s in range(3) for m in (100, 200)]}
    atomic_write_checked_json(results, doc)
    row("results.json (--resume)", {"kind": "results", "path": str(results), "fmt": "json",
                                    "keys": ["dataset", "seed", "label", "epochs"]}, cases)
    return rows


# ------------------------------------------------------------------ kill -9
def _same_buffer(a: SyntheticBuffer, b: SyntheticBuffer) -> bool:
    return (torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.class_ids, b.class_ids)
            and a.num_classes == b.num_classes and a.meta == b.meta
            and ((a.logits is None and b.logits is None) or (a.logits is not None and b.logits is not None
                                                           and torch.equal(a.logits, b.logits))))


def _bundle_params(bundle: Path) -> dict[str, np.ndarray]:
    """The parameters a bundle opens with, after the checks that make it whole: ``read_manifest`` verifies every
    file's size and sha256 against the manifest (and the manifest's own checksum); no sessions are needed for that."""
    manifest = read_manifest(bundle)
    return open_parameters(bundle, manifest, load_tensors(bundle))[0]


def _child(write: Callable[[], None], kill_at: int | None = None, report: int | None = None) -> int:
    """Fork a child that runs ``write`` and leaves without the parent's cleanup. ``kill_at``: the child SIGKILLs
    itself at that Python call / return event (counted by a profile hook), a moment chosen independently of the
    machine's load; ``report``: a pipe to write ``"<events> <first atomic_write call event>"`` to when done."""
    pid = os.fork()
    if pid == 0:
        count, write_start = 0, -1

        def hook(frame, event, arg):  # noqa: ARG001
            nonlocal count, write_start
            count += 1
            if write_start < 0 and event == "call" and frame.f_code.co_name == "atomic_write":
                write_start = count
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        code = 0
        if kill_at is not None or report is not None:
            sys.setprofile(hook)
        try:
            write()
        except BaseException:  # noqa: BLE001
            code = 1
        sys.setprofile(None)
        if report is not None:
            os.write(report, f"{count} {write_start}".encode())
        os._exit(code)
    return pid


def _wait(pid: int, limit: float = 120.0) -> int:
    """waitpid with a limit: a child stuck past it (e.g. a lock held at fork time) is killed; its wait status."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _measure(write: Callable[[], None], restore: Callable[[], None], repeats: int = 3) -> tuple[float, int, int]:
    """Median seconds of a write in a forked child, and its Python events in all and before ``atomic_write``."""
    times, events = [], []
    for _ in range(repeats):
        restore()
        read, send = os.pipe()
        started = time.perf_counter()
        status = _wait(_child(write, report=send))
        times.append(time.perf_counter() - started)
        os.close(send)
        with os.fdopen(read) as pipe:
            events.append(tuple(int(v) for v in pipe.read().split()))
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError("the write to be killed fails on its own (or hung)")
    total, start = min(events)
    return statistics.median(times), total, max(1, start)


def kill_target(name: str, trials: int, seed: int, write: Callable[[], None], restore: Callable[[], None],
                state: Callable[[], str], temporaries: Callable[[], list[Path]]) -> dict[str, Any]:
    """``trials`` times: restore the old version, fork a child that writes the new one and kill it; then ``state()``
    must be 'old' or 'new'. Kill moments, in turn: at a Python event drawn over the whole run, at one drawn over the
    write itself (from the first ``atomic_write`` call on: the moments that matter), and SIGKILL from the parent after
    a delay drawn over the write's last fifth (moments inside C calls: bytes half written, fsync, rename)."""
    rng = np.random.default_rng(seed)
    duration, events, write_start = _measure(write, restore)
    outcomes = {"old": 0, "new": 0, "torn": 0}
    killed = 0
    examples: list[str] = []
    started = time.time()
    for k in range(trials):
        restore()
        if k % 3 == 2:
            pid = _child(write)
            time.sleep(duration * rng.uniform(0.8, 1.1))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            low = 1 if k % 3 == 0 else write_start
            pid = _child(write, kill_at=int(rng.integers(low, events + 1)))
        status = _wait(pid)
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
            "killed": killed, "write_seconds": duration, "python_events": events, "write_starts_at_event": write_start,
            "trial_seconds": (time.time() - started) / max(1, trials), "temporaries_left_by_kills": left,
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
    before = _bundle_params(bundle)

    def restore_bundle() -> None:
        for p in bundle.iterdir():
            if p.name not in pristine:
                p.unlink()
        for n, data in pristine.items():
            (bundle / n).write_bytes(data)

    def bundle_state() -> str:
        params = _bundle_params(bundle)
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

    # 4. A benchmark's results document (atomic_write_checked_json), ~0.3 MB.
    results = folder / "results.json"
    doc = lambda v: {"runs": [{"dataset": "mnist", "seed": i, "value": v, "pad": "x" * 200} for i in range(1000)]}  # noqa: E731
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


# ------------------------------------------------------------------ distributed
def _children(pid: int) -> list[int]:
    try:
        return [int(v) for v in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def distributed_trial(work: Path, mode: str, fault: str, delay: float, timeout: float, iterations: int,
                      trial: int) -> dict[str, Any]:
    """One ``replaykit distill --out`` run split over two ranks (a torchrun-style gloo pair, or ``--workers 2``);
    ``delay`` s after the start the parent SIGKILLs (``fault="kill"``) or SIGSTOPs (``"hang"``) rank 1 / a local
    worker. Returns what rank 0 / the command did: exit code, whether its error names the rank, seconds from the
    fault to its exit, and whether anything was written."""
    import socket

    folder = work / f"dist_{mode}_{fault}_{trial}"
    folder.mkdir()
    out = folder / "buffer.safetensors"
    argv = [sys.executable, "-m", "replaykit", "distill", "--dataset", "digits", "--method", "dm", "--ipc", "2",
            "--iterations", str(iterations), "--classes", "0,1,2,3", "--quiet", "--out", str(out),
            "--worker-timeout", f"{timeout:g}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    peer = None
    if mode == "torchrun":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
        peer = subprocess.Popen(argv, env={**env, "RANK": "1", "LOCAL_RANK": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        lead = subprocess.Popen(argv, env={**env, "RANK": "0", "LOCAL_RANK": "0"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    else:
        lead = subprocess.Popen(argv + ["--workers", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    started = time.monotonic()
    victim = None
    while time.monotonic() - started < delay and lead.poll() is None:
        time.sleep(0.01)
    if lead.poll() is None:
        if peer is not None:
            victim = peer.pid
        else:
            workers = _children(lead.pid)
            victim = workers[-1] if workers else None  # the last started: a worker rank, not a helper
        if victim is not None:
            os.kill(victim, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    faulted = time.monotonic()
    try:
        _, stderr = lead.communicate(timeout=timeout * 4 + 300)
    except subprocess.TimeoutExpired:
        lead.kill()
        _, stderr = lead.communicate()
    ended = time.monotonic()
    for pid in [victim] + _children(lead.pid) if victim else _children(lead.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass
    if peer is not None:
        peer.kill()
        peer.wait()
    written = sorted(p.name for p in folder.iterdir())
    error = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return {"fault_at_s": round(faulted - started, 3), "faulted": victim is not None, "exit_code": lead.returncode,
            "names_rank": error.partition("error: ")[2].startswith(("rank 1 ", "worker rank 1 ")),  # the victim, first
            "seconds_after_fault": round(ended - faulted, 3), "written": written, "error": error[:300]}


def run_distributed(work: Path, trials: int, seed: int, timeout: float = 5.0, iterations: int = 300) -> list[dict[str, Any]]:
    """Per launch mode and fault, ``trials`` runs with the fault at a moment drawn over an unfaulted run's length."""
    rng = np.random.default_rng(seed)
    rows = []
    for mode in ("torchrun", "workers"):
        clean = distributed_trial(work, mode, "none", 1e9, timeout, iterations, -1)
        if clean["exit_code"] != 0 or clean["written"] != ["buffer.safetensors"]:
            raise RuntimeError(f"the unfaulted {mode} run failed: {clean}")
        length = clean["fault_at_s"]  # the unfaulted run's length (its "fault" never came)
        for fault in ("kill", "hang"):
            runs = [distributed_trial(work, mode, fault, float(rng.uniform(0.1, 0.9) * length), timeout, iterations, k)
                    for k in range(trials)]
            faulted = [r for r in runs if r["faulted"]]
            named = [r for r in faulted if r["exit_code"] != 0 and r["names_rank"]]
            rows.append({"target": f"{mode}: rank 1 {'SIGKILLed' if fault == 'kill' else 'SIGSTOPped (hung)'} mid-run",
                         "trials": len(runs), "faulted": len(faulted), "named_rank": len(named),
                         "written": sum(bool(r["written"]) for r in faulted),
                         "worker_timeout_s": timeout, "unfaulted_run_s": length,
                         "worst_seconds_after_fault": max((r["seconds_after_fault"] for r in faulted), default=None),
                         "runs": runs})
            r = rows[-1]
            print(f"distributed {r['target']}: {r['faulted']}/{r['trials']} faulted, {r['named_rank']} named the rank, "
                  f"{r['written']} wrote a file, worst {r['worst_seconds_after_fault']} s after the fault "
                  f"(timeout {timeout:g} s, unfaulted run {length:.1f} s)", flush=True)
    return rows


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


def _commit() -> str | None:
    """The code's commit: git's, or REPLAYKIT_COMMIT for a run from an exported copy of the tree."""
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else os.environ.get("REPLAYKIT_COMMIT")


PARTS = ("fuzz", "kill", "device", "distributed")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run (default all: {','.join(PARTS)}); a subset updates --out in place")
    p.add_argument("--fuzz-rows", default=None,
                   help="fuzz only the targets whose names contain this (e.g. manifest); their rows replace those in --out")
    p.add_argument("--dist-trials", type=int, default=5, help="distributed runs per launch mode and fault (default 5)")
    p.add_argument("--worker-timeout", type=float, default=10.0, help="--worker-timeout of the distributed runs")
    p.add_argument("--quick", action="store_true", help="CI smoke: a few hundred fuzz cases, 20 kill trials, 4 rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=None, help="fuzz cases per format (default 10000; quick 200)")
    p.add_argument("--resigned-cases", type=int, default=None,
                   help="fuzz cases per bundle file with the checksums re-made to match (default 10000; quick 100)")
    p.add_argument("--trials", type=int, default=None, help="kill trials per target (default 200; quick 10)")
    p.add_argument("--rounds", type=int, default=None, help="device retrain rounds (default 20; quick 4)")
    p.add_argument("--width", type=int, default=None, help="ConvNet width of the device bundle (default 32; quick 16)")
    p.add_argument("--memory-limit-mb", type=float, default=100.0)
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/faults.json; quick: runs/)")
    args = p.parse_args(argv)
    if args.quick and args.parts == ",".join(PARTS):
        args.parts = "fuzz,kill,device"  # tests/test_distributed.py covers dead and hung ranks in the suite
    if not set(args.parts.split(",")) <= set(PARTS):
        p.error(f"--parts takes names from {PARTS}")
    args.cases = args.cases or (200 if args.quick else 10_000)
    args.resigned_cases = args.resigned_cases if args.resigned_cases is not None else (100 if args.quick else 10_000)
    args.trials = args.trials or (10 if args.quick else 200)
    args.rounds = args.rounds or (4 if args.quick else 20)
    args.width = args.width or (16 if args.quick else 32)
    args.out = args.out or str(REPO / ("runs/faults_quick.json" if args.quick else "benchmarks/results/faults.json"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the kill trials fork: no OpenMP pool in the parent
    started, load_before = time.time(), os.getloadavg()
    parts = set(args.parts.split(","))
    doc: dict[str, Any] = {"fuzz": [], "kill": []}
    if parts != set(PARTS) and Path(args.out).is_file():  # a part run again: the others' figures stay
        doc = read_checked_json(args.out)
        earlier = {k: doc.pop(k) for k in ("args", "commit", "seconds", "date", "load_average_before_after") if k in doc}
        if earlier:  # written before per-part run records: that run did fuzz, kill and device
            doc.setdefault("runs", {})["fuzz,kill,device"] = earlier
    doc.update(bugs_found=BUGS_FOUND, machine_note=f"{os.cpu_count()}-CPU machine, no GPU", partial=True)
    doc.setdefault("runs", {})

    def save() -> None:  # after every part, so that a run cut short keeps what it measured
        doc["runs"][args.parts] = {"args": vars(args), "commit": _commit(), "seconds": time.time() - started,
                                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   "load_average_before_after": [list(load_before), list(os.getloadavg())]}
        atomic_write_checked_json(args.out, doc)

    with tempfile.TemporaryDirectory(prefix="replaykit-faults-") as tmp:
        work = Path(tmp)
        if parts & {"fuzz", "kill", "device"}:
            small, mnist = _bundles(work, args.seed, args.width)
            print(f"bundles ready ({time.time() - started:.0f} s)", flush=True)
        if "fuzz" in parts:
            rows = run_fuzz(work, small, args.cases, args.resigned_cases, args.seed, args.fuzz_rows)
            if args.fuzz_rows:  # the rows run again replace their earlier figures; the others stay
                fresh = {r["target"] for r in rows}
                rows = [r for r in doc.get("fuzz", []) if r["target"] not in fresh] + rows
            doc["fuzz"] = rows
            save()
        if "kill" in parts:
            doc["kill"] = kill = run_kill(work, small, args.trials, args.seed)
            for row in kill:
                print(f"kill {row['target']}: {row['trials']} trials ({row['killed']} killed mid-run), old {row['old']}, "
                      f"new {row['new']}, torn {row['torn']}, temporaries left {row['temporaries_left_by_kills']} -> "
                      f"{row['temporaries_after_next_write']} after the next write", flush=True)
            save()
        if "device" in parts:
            rounds_bundle = work / "rounds_bundle"
            shutil.copytree(mnist, rounds_bundle)
            rounds = run_device({"what": "rounds", "bundle": str(rounds_bundle), "cap": args.memory_limit_mb,
                                 "rounds": args.rounds, "images": 256, "seed": args.seed})
            rss = rounds["rss_mb"]
            rounds.update(rounds=args.rounds, width=args.width, cap_mb=args.memory_limit_mb,
                          drift_mb_round2_to_last=rss[-1] - rss[1] if len(rss) > 1 else 0.0)
            doc["retrain_rounds"] = rounds
            print(f"rounds: {args.rounds}, RSS after each {[round(v, 1) for v in rss]}, peak {rounds['peak_rss_mb']:.1f} MB",
                  flush=True)
            hostile = run_device({"what": "hostile", "bundle": str(mnist), "cap": args.memory_limit_mb, "images": 256,
                                  "seed": args.seed})
            doc["hostile_inputs"] = hostile
            for row in hostile["cases"]:
                print(f"hostile {row['input']}: {row['error']}, state unchanged {row['state_unchanged']}, bundle "
                      f"unchanged {row['bundle_unchanged']}, peak {row['peak_rss_mb']:.1f} MB", flush=True)
            save()
        if "distributed" in parts:
            doc["distributed"] = run_distributed(work, args.dist_trials, args.seed, timeout=args.worker_timeout)
            save()
    fuzz, kill = doc.get("fuzz") or [], doc.get("kill") or []
    summary = {}
    if fuzz:
        summary.update({
            "fuzz_cases_min": min(r["cases"] for r in fuzz), "fuzz_cases_total": sum(r["cases"] for r in fuzz),
            "fuzz_other_total": sum(r["other"] for r in fuzz), "fuzz_cases_over_1s": sum(r["over_1s"] for r in fuzz),
            "fuzz_worst_seconds": max(r["worst_seconds"] for r in fuzz),
            "fuzz_worst_cpu_seconds": max(r["worst_cpu_seconds"] for r in fuzz),
            "fuzz_worst_peak_mb": max(r["worst_peak_mb"] for r in fuzz)})
    if kill:
        summary.update({"kill_trials_min": min(r["trials"] for r in kill), "kill_torn_total": sum(r["torn"] for r in kill)})
    doc["summary"] = summary
    doc["partial"] = False
    save()
    print(f"wrote {args.out} in {time.time() - started:.0f} s: {json.dumps(summary)}")
    return 0


#: What the fuzzing and fault runs found, and what fixed each (each has a regression test).
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
    {"what": "a manifest whose checksum was re-made after a field was edited (a forger or a buggy writer: sha256 is no "
             "signature) raised TypeError ('int' object is not iterable: input_shape 7) or KeyError (a missing "
             "train_step_outputs, a renamed parameter in trainable) while opening",
     "fix": "edge.bundle.check_fields: types and ranges of every field the runtime reads, BundleError naming them "
            "(its first version itself raised TypeError on a std that was no list: the long run's re-checksummed "
            "manifest row counted 36 'other' before the fixes below)",
     "test": "tests/edge/test_retrainer.py::test_forged_manifest_fields_are_bundle_errors"},
    {"what": "a re-checksummed manifest whose trainable list lost a name (or whose step outputs were reordered) opened; "
             "the first fit failed with onnxruntime's ValueError (required inputs missing), or would have zipped "
             "new parameters onto the wrong names",
     "fix": "check_fields: trainable and frozen split params; the step graph's momentum inputs and its outputs follow "
            "trainable in order; Retrainer._run turns onnxruntime's ValueError into BundleError too",
     "test": "tests/edge/test_retrainer.py::test_forged_manifest_fields_are_bundle_errors"},
    {"what": "a re-checksummed manifest with replay.mix or logit_loss_weight a string or an object raised "
             "ValueError / TypeError from float()",
     "fix": "Retrainer._read_buffer checks both are numbers (CodecError -> BundleError)",
     "test": "tests/edge/test_retrainer.py::test_forged_manifest_fields_are_bundle_errors"},
    {"what": "a manifest as received, with its checksum key damaged (one flipped bit in 'manifest_sha256', or a deleted "
             "stretch taking the key and part of 'loss' with it) was read as one written before manifests were "
             "checksummed: 4 of 10,000 cases loaded changed fields (replay, loss) without an error",
     "fix": "read_manifest requires manifest_sha256 (edge/bundle.py)",
     "test": "tests/edge/test_retrainer.py::test_a_manifest_without_its_checksum_is_refused"},
    {"what": "a torchrun rank killed or stopped before it joined the process group left rank 0 with a raw "
             "DistStoreError traceback ('1/2 clients joined'), exit status 1, no rank named",
     "fix": "init_from_env raises DistributedDistillError naming the rank that did not join (with two ranks; else how "
            "many joined); the CLI prints it as an error (replaykit/distributed.py)",
     "test": "tests/test_distributed.py::test_a_rank_that_dies_before_joining_is_named_and_nothing_is_written"},
    {"what": "--workers 2, a worker SIGKILLed mid-run: the error named the survivor ('rank 0 failed on job 2: "
             "SignalException: Process N got signal: 15'): forked workers inherited the elastic agent's SIGTERM "
             "handler, so the agent's teardown of rank 0 failed rank 0's job, and its verdict file named rank 0",
     "fix": "local workers restore the default signal handlers; the launcher's error names a worker ended by the agent's "
            "SIGTERM only if no other worker failed; the agent's failure log is kept without its traceback, whose "
            "formatting imported torch._dynamo (2-12 s between the failure and the error) (replaykit/distributed.py)",
     "test": "tests/test_distributed.py::test_a_killed_local_worker_is_named_not_the_survivor_the_agent_stopped"},
    {"what": "a hung (SIGSTOPped) rank was named only once the waiting rank had finished its own jobs and then waited "
             "--worker-timeout; a hung local worker then held the run 30 s more (the agent's SIGTERM stays pending on a "
             "stopped process): --workers 2 named it 50.8 s after the fault with --worker-timeout 10",
     "fix": "every rank beats a heartbeat through the group's store and watches the others': a rank silent for half the "
            "timeout (at most 60 s), or seen dead on this host, is named at once -- rank 0's job is interrupted, a local "
            "worker that notices kills the hung one and exits; gloo transfers start only once the peer has reached them "
            "(gloo waits cannot be interrupted); torchrun ranks must join within half the timeout (replaykit/distributed.py)",
     "test": "tests/test_distributed.py::test_a_hung_local_worker_is_named_within_the_timeout"},
    {"what": "a parameter made inf by a flipped exponent bit behind re-made checksums opened; only fit found out",
     "fix": "open_parameters refuses non-finite parameters and momentum (BundleError)",
     "test": "tests/edge/test_retrainer.py::test_non_finite_parameters_behind_valid_checksums_are_refused"},
    {"what": "a model.onnx changed behind re-made checksums loaded, then failed in a Reshape at inference with "
             "onnxruntime's own Fail exception",
     "fix": "Retrainer runs its graphs through _run: onnxruntime's failures become BundleError naming the bundle "
            "(a failed fit still restores the parameters)",
     "test": "tests/edge/test_retrainer.py::test_a_graph_that_fails_to_run_is_a_bundle_error"},
    {"what": "a results.json with one flipped bit in the name of its checksum key had no checksum left and was read as "
             "a legacy document (written before checksums), damaged key and all: different data, no error",
     "fix": "read_checked_json refuses a document without the checksum key that has a key like it (replaykit/fileio.py)",
     "test": "tests/test_fileio.py::test_a_damaged_checksum_key_is_not_read_as_a_legacy_document"},
    {"what": "an Avalanche checkpoint could not hold the strategy's optimizer (dill cannot pickle torch 2.14's SGD: "
             "'Can't pickle sentinel'), so it was left out (exclude=['optimizer']); Avalanche keeps momentum across "
             "experiences, and a run killed after experience 2 and resumed ended at 34.26% test accuracy vs 33.43% "
             "uninterrupted (digits, 5 experiences, 2 epochs, width 8, dm 10 iterations, held logits, seed 0)",
     "fix": "replaykit.checkpointing registers dill reducers for torch optimizers (class by name + its own state), "
            "imported by replaykit.avalanche: the whole strategy checkpoints and resumes to the same accuracy, "
            "parameters and buffer bytes",
     "test": "tests/test_resume.py::test_a_run_killed_after_a_checkpoint_resumes_to_the_same_accuracy_and_buffer_bytes"},
    {"what": "a distillation failing mid-experience raised the method's own exception without naming the class, and "
             "left the learner referenced by the buffer",
     "fix": "DistillationError names the class, the method and the reason; the held buffer is replaced only when "
            "every class is done; the learner reference is dropped on failure too (replaykit/avalanche/storage.py)",
     "test": "tests/test_resume.py::test_a_distillation_failing_mid_experience_names_the_class_and_keeps_the_held_buffer"},
    {"what": "export's own check and verify_bundle compared multi-step trajectories with PyTorch: a ReLU tie on some "
             "CPU could fail an export and the suite",
     "fix": "each step from PyTorch's state, momentum compared too (edge/exporter.py verify_bundle)",
     "test": "tests/edge/test_export.py::test_train_steps_match_pytorch"},
]


if __name__ == "__main__":
    sys.exit(main())
