"""The CUDA check (do the GPU paths give the CPU's results, and how fast), as one script for a machine with a GPU
(under 8 minutes on one H200).

    python benchmarks/gpu_check.py --out runs/gpu_check.json            # on the CUDA machine
    python benchmarks/gpu_check.py --device cpu --quick --out x.json    # dry run of the same code (CI, < 1 min)

Four parts, one table, one JSON (``--out``):

(a) the user path: each distilled and compressed spec of ``benchmarks/class_incremental.py``'s defaults
    (``DISTILLED`` and the jpeg / downsample ``BASELINES``; ``--all-specs`` adds the rest) on Split-MNIST,
    seed 0, on the device, beside the committed CPU row of the same seed and settings
    (``benchmarks/results/class_incremental.json``), flagged when they differ by more than 2 points;
(b) ``replaykit distill --dataset mnist --method dm --ipc 10 --iterations 2000 --device D`` (a subprocess,
    as a user runs it) against the 15 s bar, and dm at the reference settings (width 128, 256 real images
    per class, DSA on) against the reference loop's 28.1 s;
(c) every other registered method at IPC 10 on MNIST with its distillation seconds (time budgets capped
    by ``--method-seconds``);
(d) the ``cuda``-marked tests (pytest).

Runs from a source checkout with the machine's own torch (no version is assumed) and no network:
``PYTHONPATH=$PWD/.gpu-site:$PWD REPLAYKIT_DATA=$PWD/.gpu-data`` (see ../shared/gpu/README.md).
``--max-seconds`` stops starting new items once spent; what was left is listed as skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from source, whatever the working directory
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from replaykit.device import resolve_device  # noqa: E402

DM_DEFAULT_BAR_S = 15.0  # the bar set for the GPU path: `replaykit distill ... --iterations 2000 --device cuda` on one H200
DM_REFERENCE_BAR_S = 28.1  # the reference-style DM loop (width 128, 256 real per class, no DSA) on the same H200
ACCURACY_POINTS = 2.0  # a spec's final accuracy on the GPU may differ from its CPU row by at most this
CPU_ROWS = ROOT / "benchmarks" / "results" / "class_incremental.json"


def _class_incremental():
    """``benchmarks/class_incremental.py`` as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("class_incremental", ROOT / "benchmarks" / "class_incremental.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def user_specs(all_specs: bool) -> list[str]:
    """The class-incremental default specs the check runs: distilled and compressed (all with ``all_specs``)."""
    ci = _class_incremental()
    compressed = [b for b in ci.BASELINES if b.split(":")[0] in ("jpeg", "downsample")]
    others = [b for b in ci.BASELINES if b not in compressed]
    return list(ci.DISTILLED) + compressed + (others if all_specs else [])


def cpu_rows(path: Path = CPU_ROWS) -> tuple[dict[tuple, float], int]:
    """Committed CPU final accuracies by (dataset, seed, epochs, label), and the width they were run at."""
    doc = json.loads(path.read_text())
    rows = {(r["dataset"], r["seed"], r["epochs"], r["label"]): float(r["final_accuracy"]) for r in doc["runs"]}
    return rows, int(doc["config"]["width"])


class Clock:
    """The run's time cap: items started after ``limit`` seconds are recorded as skipped."""

    def __init__(self, limit: float) -> None:
        self.start, self.limit = time.perf_counter(), limit

    def spent(self) -> float:
        return time.perf_counter() - self.start

    def allows(self) -> bool:
        return self.spent() < self.limit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_user_path(args, device: torch.device, clock: Clock) -> list[dict[str, Any]]:
    """(a): each spec on Split-MNIST, seed 0, 1 epoch, on ``device``, beside its committed CPU row."""
    from replaykit.continual import RunConfig, make_stream, parse_spec, run

    rows_cpu, width = cpu_rows()
    config = RunConfig(dataset="mnist", seed=0, epochs=1, width=8 if args.quick else width, device=str(device),
                       data_root=args.data_root, train_per_class=20 if args.quick else None, test_per_class=10 if args.quick else None)
    stream = make_stream(config)
    out = []
    specs = user_specs(args.all_specs)
    if args.quick:  # the two crash classes of the issue: held logits + JPEG views + mixing, and a JPEG buffer with mixing
        specs = [specs[0], next(t for t in specs if t.startswith("jpeg") and "mix=" in t)]
    for text in specs:
        spec = parse_spec(text)
        if args.quick:  # code path only: a few dm iterations
            spec = parse_spec(text.replace("iterations=100", "iterations=2"))
        row: dict[str, Any] = {"part": "a", "item": spec.label}
        if not clock.allows():
            out.append({**row, "status": "skipped (time cap)"})
            continue
        started = time.perf_counter()
        try:
            result = run(spec, config, stream)
        except Exception as exc:  # a crash is the finding: record it, go on
            out.append({**row, "status": f"FAILED: {type(exc).__name__}: {exc}"[:300]})
            continue
        _sync(device)
        cpu = rows_cpu.get(("mnist", 0, 1, spec.label))
        diff = None if cpu is None else 100 * (result.final_accuracy - cpu)
        comparable = cpu is not None and not args.quick
        row.update(accuracy=round(100 * result.final_accuracy, 2), cpu_accuracy=None if cpu is None else round(100 * cpu, 2),
                   diff_points=None if diff is None else round(diff, 2), distill_seconds=round(sum(result.distill_seconds), 2),
                   seconds=round(time.perf_counter() - started, 1), memory_bytes=result.memory_bytes)
        if not comparable:
            row["status"] = "ran (quick: not comparable)" if args.quick else "ran (no CPU row)"
        else:
            row["status"] = "ok" if abs(diff) <= ACCURACY_POINTS else f"FLAG: {diff:+.2f} points from the CPU row"
        out.append(row)
    return out


def _cli_dm(args, device: torch.device, iterations: int) -> dict[str, Any]:
    """``replaykit distill --dataset mnist --method dm --ipc 10`` in a subprocess; its distillation seconds."""
    from replaykit.buffer import SyntheticBuffer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dm.safetensors"
        command = [sys.executable, "-m", "replaykit", "distill", "--dataset", "mnist", "--method", "dm", "--ipc", "10",
                   "--iterations", str(iterations), "--device", str(device), "--out", str(path), "--quiet"]
        if args.data_root:
            command += ["--data-root", args.data_root]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"replaykit distill failed: {proc.stderr[-1500:]}")
        meta = SyntheticBuffer.load(path).meta
    return {"command": " ".join(command[1:]).replace(str(path), "OUT"), "distill_seconds": float(meta["distill_seconds"]),
            "iterations_done": meta.get("iterations_done"), "process_seconds": round(time.perf_counter() - started, 1)}


def _distill_timed(name: str, x, y, meta, device: torch.device, **options) -> dict[str, Any]:
    from replaykit import distill

    buffer = distill.make(name, device=str(device), progress=False, **options).distill(x, y, num_classes=10, meta=meta)
    return {"distill_seconds": float(buffer.meta["distill_seconds"]), "iterations_done": buffer.meta.get("iterations_done"),
            "stopped_by": buffer.meta.get("stopped_by"), "images": len(buffer)}


def _mnist(args, per_class: int | None):
    from replaykit.data import dataset_info, load_tensors

    x, y = load_tensors("mnist", train=True, root=args.data_root)
    if per_class is not None:
        keep = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in range(10)])
        x, y = x[keep], y[keep]
    return x, y, dataset_info("mnist").meta()


def part_dm_speed(args, device: torch.device, clock: Clock) -> list[dict[str, Any]]:
    """(b): dm at the CLI defaults (bar 15 s) and at the reference settings with DSA (bar 28.1 s), 2000 iterations."""
    iterations = 3 if args.quick else 2000
    reference = dict(width=16, real_batch=16) if args.quick else dict(width=128, real_batch=256)
    items: list[tuple[str, float, Callable[[], dict[str, Any]]]] = [
        ("dm CLI defaults (width 32, 64 real/class, DSA)", DM_DEFAULT_BAR_S, lambda: _cli_dm(args, device, iterations)),
        (f"dm reference (width {reference['width']}, {reference['real_batch']} real/class, DSA)", DM_REFERENCE_BAR_S,
         lambda: _distill_timed("dm", *_mnist(args, 100 if args.quick else None), device, ipc=10 if not args.quick else 1,
                                iterations=iterations, augment=True, **reference)),
    ]
    out = []
    for label, bar, job in items:
        row: dict[str, Any] = {"part": "b", "item": f"{label}, {iterations} it", "bar_seconds": bar}
        if not clock.allows():
            out.append({**row, "status": "skipped (time cap)"})
            continue
        try:
            row.update(job())
        except Exception as exc:
            out.append({**row, "status": f"FAILED: {type(exc).__name__}: {exc}"[:300]})
            continue
        if args.quick or device.type != "cuda":
            row["status"] = "ran (bar applies to CUDA at 2000 iterations)"
        else:
            row["status"] = "ok" if row["distill_seconds"] <= bar else f"FLAG: {row['distill_seconds']:.1f} s > {bar} s"
        out.append(row)
    return out


def part_methods(args, device: torch.device, clock: Clock) -> list[dict[str, Any]]:
    """(c): every registered method but dm at IPC 10 on MNIST (quick: IPC 1, a few iterations, 50 images a class)."""
    import inspect

    from replaykit import distill

    x, y, meta = _mnist(args, 20 if args.quick else None)
    out = []
    for name in distill.available():
        if name == "dm":
            continue
        row: dict[str, Any] = {"part": "c", "item": f"{name} IPC {1 if args.quick else 10}"}
        if not clock.allows():
            out.append({**row, "status": "skipped (time cap)"})
            continue
        accepted = set()
        for klass in distill.REGISTRY[name].__mro__:
            if "__init__" in vars(klass):
                accepted |= set(inspect.signature(klass.__init__).parameters)
        options: dict[str, Any] = {"ipc": 1 if args.quick else 10}
        if "time_budget" in accepted:
            options["time_budget"] = args.method_seconds
        if getattr(distill.REGISTRY[name], "needs_learner", False):  # an untrained network stands in for the learner
            from replaykit.networks import ConvNet

            options["learner"] = ConvNet(tuple(x.shape[1:]), 10, width=8)
        if args.quick:
            options.update({k: v for k, v in {"iterations": 2, "feature_epochs": 1, "width": 8, "feature_width": 8, "expert_images": 64,
                                               "expert_epochs": 2, "max_start_epoch": 1, "match_epochs": 1, "syn_steps": 2,
                                               "real_batch": 8, "batch_real": 8, "outer_loop": 1, "inner_loop": 1}.items()
                            if k in accepted})
        try:
            row.update(_distill_timed(name, x, y, meta, device, **options))
            row["status"] = "ok"
        except Exception as exc:
            row["status"] = f"FAILED: {type(exc).__name__}: {exc}"[:300]
        out.append(row)
    return out


def part_cuda_tests(args, clock: Clock) -> list[dict[str, Any]]:
    """(d): the ``cuda``-marked tests, counted from pytest's JUnit report."""
    row: dict[str, Any] = {"part": "d", "item": "pytest -m cuda " + " ".join(args.tests)}
    if not clock.allows():
        return [{**row, "status": "skipped (time cap)"}]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={report}",
                               *args.tests], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        if report.is_file():
            for suite in ET.parse(report).getroot().iter("testsuite"):
                for key in counts:
                    counts[key] += int(suite.get(key, 0))
    row.update(counts, seconds=round(time.perf_counter() - started, 1), returncode=proc.returncode)
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    row["passed"] = passed
    bad = counts["failures"] + counts["errors"]
    row["status"] = ("ok" if bad == 0 and proc.returncode in (0, 5) else f"FAILED: {bad} failing\n{proc.stdout[-2000:]}")
    return [row]


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| part | item | result | seconds | status |", "|---|---|---|---:|---|"]
    for r in rows:
        if r["part"] == "a" and "accuracy" in r:
            result = f"{r['accuracy']:.2f} % (CPU row {r['cpu_accuracy'] if r['cpu_accuracy'] is not None else '–'}" + (
                f", {r['diff_points']:+.2f})" if r.get("diff_points") is not None else ")")
            seconds = r["seconds"]
        elif r["part"] in ("b", "c") and "distill_seconds" in r:
            result = f"distill {r['distill_seconds']:.2f} s, {r.get('iterations_done') or '–'} it"
            result += f" (bar {r['bar_seconds']} s)" if "bar_seconds" in r else ""
            seconds = r["distill_seconds"]
        elif r["part"] == "d" and "tests" in r:
            result = f"{r['passed']} passed, {r['skipped']} skipped, {r['failures'] + r['errors']} failed"
            seconds = r["seconds"]
        else:
            result, seconds = "–", ""
        status = str(r["status"]).splitlines()[0]
        lines.append(f"| {r['part']} | {r['item']} | {result} | {seconds} | {status} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --quick for a dry run")
    p.add_argument("--quick", action="store_true", help="exercise every part on tiny settings (a CPU dry run: no bars apply)")
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--parts", default="abcd", help="which parts to run (default abcd)")
    p.add_argument("--all-specs", action="store_true", help="(a) also runs the other baselines (naive, replay, der...)")
    p.add_argument("--method-seconds", type=float, default=20.0, help="(c) time budget given to methods that take one")
    p.add_argument("--max-seconds", type=float, default=400.0, help="start no new item after this many seconds")
    p.add_argument("--tests", nargs="*", default=None, help="(d) test paths (default: tests; quick: tests/test_device.py)")
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        p.error(f"{exc} (a dry run without a GPU: --device cpu --quick)")
    if device.type != "cuda" and not args.quick:
        p.error("without CUDA only the dry run makes sense: add --quick")
    args.tests = args.tests or (["tests/test_device.py"] if args.quick else ["tests"])
    clock = Clock(args.max_seconds)
    rows: list[dict[str, Any]] = []
    parts = {"b": lambda: part_dm_speed(args, device, clock), "a": lambda: part_user_path(args, device, clock),
             "d": lambda: part_cuda_tests(args, clock), "c": lambda: part_methods(args, device, clock)}
    for key in "badc":  # the bars first, the open-ended timings last
        if key in args.parts:
            rows += parts[key]()
            print(format_table([r for r in rows if r["part"] == key]).split("\n", 2)[-1], flush=True)
    rows.sort(key=lambda r: r["part"])
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    doc = {
        "check": "GPU check (benchmarks/gpu_check.py)", "device": str(device), "gpu": gpu, "quick": args.quick,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs" + (f", {gpu}" if gpu else ", no GPU used"),
        "bars": {"dm_default_seconds": DM_DEFAULT_BAR_S, "dm_reference_seconds": DM_REFERENCE_BAR_S, "accuracy_points": ACCURACY_POINTS},
        "seconds": round(clock.spent(), 1), "rows": rows,
        "failed": [r["item"] for r in rows if str(r["status"]).startswith(("FAILED", "FLAG"))],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"\n{doc['machine']}, torch {doc['torch']} (CUDA {doc['cuda']}), {doc['seconds']} s\n")
    print(format_table(rows))
    print(f"\n{len(doc['failed'])} flagged or failed: {doc['failed']}" if doc["failed"] else "\nnothing flagged or failed")
    return 1 if doc["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
