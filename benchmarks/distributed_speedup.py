"""Wall time of ``replaykit distill --workers N`` against one worker, same buffer bytes.

Runs the real command line end to end (process start, data loading, launch, the exchange, save)
for each configuration, alternating them ``--repeats`` times so that a change in the machine's
load hits every configuration alike, and checks that every run wrote the same tensor bytes.
Without ``--iterations`` the method runs its own default (``dm``: 2000 iterations), as a user's
``replaykit distill`` would.

    flock /tmp/replaykit-bench.lock nice -n 0 python benchmarks/distributed_speedup.py \\
        --dataset mnist --ipc 10 --repeats 2 --probe-shape 3,64,64 --out benchmarks/results/distributed.json

Configurations (``--configs``): ``1w`` (``--workers 1``: the same per-class jobs as the workers
get, one after the other in the command's own process, with one intra-op thread, as each worker),
``{N}w`` (``--workers N``, one thread each) and ``1p-default-threads`` (no ``--workers``: one
distill call over all classes with torch's default intra-op threads, what a plain
``replaykit distill`` does; its last bits differ, see ``replaykit.distributed``).

Each run also sets ``$REPLAYKIT_TRACE``, so the command and its workers note when each phase
ended (``replaykit.distributed.trace``); ``breakdown`` in the JSON gives the phases' seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors import safe_open

from replaykit.fileio import atomic_write_json


def _run(cli: list[str], env: dict[str, str], out: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="trace-") as trace_dir:
        began = time.time()
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "replaykit", *cli, "--out", str(out)],
                              env={**env, "REPLAYKIT_TRACE": trace_dir}, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        ended = began + seconds
        if done.returncode:
            raise SystemExit(f"{' '.join(cli)} failed:\n{done.stderr[-3000:]}")
        traces = {f.stem: dict(json.loads(f.read_text())["events"]) for f in Path(trace_dir).glob("*.json")}
    with safe_open(str(out), framework="pt") as handle:
        header = json.loads(handle.metadata()["replaykit"])
    meta = header["meta"]
    return {"wall_seconds": round(seconds, 2), "tensor_sha256": header["sha256"], "iterations": meta.get("iterations_done"),
            "part_seconds": meta.get("part_seconds"), "distill_seconds": meta["distill_seconds"],
            "breakdown": _breakdown(traces, began, ended)}


def _breakdown(traces: dict[str, dict[str, float]], began: float, ended: float) -> dict:
    """Seconds of each phase of one run, from the events the command and its workers noted."""
    parent = traces.get("parent", {})
    ranks = sorted((k for k in traces if k.startswith("rank")), key=lambda k: int(k[4:]))

    def span(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 3)

    out: dict = {"start_to_command": span(began, parent.get("cli_start"))}  # interpreter, imports (torch), parser
    if not ranks:  # one worker: everything in the command's process
        out.update(load_data=span(parent.get("cli_start"), parent.get("data_ready")),
                   distill=span(parent.get("data_ready"), parent.get("distilled")),
                   merge_and_save=span(parent.get("distilled"), parent.get("saved")))
    else:
        out["command_to_launch"] = span(parent.get("cli_start"), parent.get("launch"))  # jobs, job file
        out["ranks"] = {}
        for name in ranks:
            ev = traces[name]
            out["ranks"][name] = {
                "launch_to_worker": span(parent.get("launch"), ev.get("worker_import", ev.get("worker_start"))),
                "worker_imports": span(ev.get("worker_import"), ev.get("worker_start")),  # spawned workers only
                "join_group": span(ev.get("worker_start"), ev.get("group_joined")),
                "load_data": span(ev.get("group_joined"), ev.get("data_ready")),
                "distill": span(ev.get("data_ready"), ev.get("distilled")),
                "exchange": span(ev.get("distilled"), ev.get("exchanged")),  # includes waiting for slower ranks
                "write_result": span(ev.get("exchanged"), ev.get("written")),
            }
        last = max(traces[name].get("written", traces[name].get("exchanged", 0.0)) for name in ranks)
        out.update(workers_exit_to_launch_return=span(last, parent.get("workers_done")),
                   read_parts=span(parent.get("workers_done"), parent.get("parts_read")),
                   merge_and_save=span(parent.get("parts_read"), parent.get("saved")))
    out["exit"] = span(parent.get("saved"), ended)
    return out


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _competitors() -> list[str]:
    """Other processes using CPU at normal priority (niced ones barely take CPU from a nice-0 run)."""
    ps = subprocess.run(["ps", "-eo", "pid,ni,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout.splitlines()[1:]
    busy = []
    for line in ps:
        pid, nice, cpu = line.split()[:3]
        if int(pid) != os.getpid() and nice.lstrip("-").isdigit() and int(nice) <= 0 and float(cpu) >= 20.0:
            busy.append(line.strip())
    return busy[:5]


def _wait_for_quiet(limit: float) -> list[str]:
    """Wait (at most ``limit`` s) until no other process uses CPU at normal priority; return what is still there."""
    deadline = time.monotonic() + limit
    while (busy := _competitors()) and time.monotonic() < deadline:
        time.sleep(5)
    return busy


def _probe(shape: list[int], images: int, method: str, ipc: int, iterations: int, seed: int) -> dict:
    """Seconds to distill one class of random ``images`` of ``shape`` with one thread (cost depends on the
    shape, ipc and iterations, not on what the pixels show)."""
    import torch

    from replaykit.distributed import ClassJob

    from replaykit.runtime import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()  # as the command and its workers do
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((images, *shape), generator=gen)
    natural = {"dataset": "cifar10"}  # only picks the natural-image augmentation (colour, flips) for 3-channel data
    job = ClassJob(method, {"iterations": iterations}, ipc, seed, x, torch.zeros(images, dtype=torch.int64), 1000,
                   natural if shape[0] == 3 else {})
    start = time.perf_counter()
    part = job.run()
    return {"shape": shape, "images": images, "method": method, "ipc": ipc, "iterations": iterations,
            "threads": 1, "seconds": round(time.perf_counter() - start, 2), "distill_seconds": part.meta["distill_seconds"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--method", default="dm")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--iterations", type=int, help="default: the method's own (dm: 2000)")
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--configs", default="1w,Nw",
                   help="comma-separated, run in this order each repeat (Nw: the --workers run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each run, wait up to this many seconds for other nice-0 CPU users to finish")
    p.add_argument("--probe-shape", help="also time one class of random images of this C,H,W (one thread), e.g. 3,64,64")
    p.add_argument("--probe-images", type=int, default=1300, help="real images in the probed class (ImageNet: ~1300)")
    p.add_argument("--probe-iterations", type=int, default=200,
                   help="iterations of the probe (its cost grows linearly with them: scale to the default 2000)")
    p.add_argument("--probe-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", required=True, help="JSON file for the raw timings")
    args = p.parse_args(argv)
    if args.probe_only:  # the subprocess of --probe-shape
        shape = [int(v) for v in args.probe_shape.split(",")]
        print(json.dumps(_probe(shape, args.probe_images, args.method, args.ipc, args.probe_iterations, args.seed)))
        return 0

    cli = ["distill", "--dataset", args.dataset, "--method", args.method, "--ipc", str(args.ipc),
           *(["--iterations", str(args.iterations)] if args.iterations is not None else []),
           "--classes", args.classes, "--seed", str(args.seed), "--quiet"]
    base_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    parallel = f"{args.workers}w"
    default_threads = {k: v for k, v in base_env.items() if k != "OMP_NUM_THREADS"}
    known = {
        "1w": (["--workers", "1"], base_env),
        parallel: (["--workers", str(args.workers)], base_env),
        "1p-default-threads": ([], default_threads),
    }
    names = [parallel if name == "Nw" else name for name in args.configs.split(",") if name.strip()]
    if set(names) - set(known) or parallel not in names:
        p.error(f"--configs must name {parallel} (or Nw) and some of {sorted(known)}, got {args.configs!r}")
    configs = {name: known[name] for name in names}
    record = {
        "issue": 11, "command": " ".join([sys.executable, *sys.argv]), "cli": "replaykit " + " ".join(cli),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
        "cpus": os.cpu_count(), "uptime_before": _uptime(), "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, (flags, env) in configs.items():
                busy = _wait_for_quiet(args.quiet_wait)
                result = _run(cli + flags, env, Path(tmp) / f"{name}.safetensors")
                result.update(config=name, repeat=repeat, flags=" ".join(flags),
                              omp_num_threads=env.get("OMP_NUM_THREADS"), uptime_after=_uptime(),
                              nice0_cpu_users_before=busy, nice0_cpu_users_after=_competitors())
                record["runs"].append(result)
                print(f"{name:>20} repeat {repeat}: {result['wall_seconds']:.1f} s ({result['uptime_after']})", flush=True)
    if args.probe_shape:
        _wait_for_quiet(args.quiet_wait)
        probe = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--probe-only"],
                               env={**base_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=True)
        record["probe"] = json.loads(probe.stdout.strip().splitlines()[-1])
        record["probe"]["uptime_after"] = _uptime()
        print("probe:", record["probe"], flush=True)
    walls = {name: [r["wall_seconds"] for r in record["runs"] if r["config"] == name] for name in configs}
    mean = {name: round(sum(w) / len(w), 2) for name, w in walls.items()}
    best = {name: min(w) for name, w in walls.items()}
    record["mean_wall_seconds"], record["best_wall_seconds"] = mean, best
    others = [name for name in configs if name != parallel]
    record["speedup"] = {f"{parallel} over {name}": round(mean[name] / mean[parallel], 3) for name in others}
    record["speedup_best_runs"] = {f"{parallel} over {name}": round(best[name] / best[parallel], 3) for name in others}
    record["identical_tensors"] = len({r["tensor_sha256"] for r in record["runs"] if r["flags"]}) == 1  # --workers runs
    record["uptime_after"] = _uptime()
    atomic_write_json(args.out, record)
    print(json.dumps({k: record[k] for k in ("mean_wall_seconds", "speedup", "speedup_best_runs", "identical_tensors")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
