"""Issue 11: wall time of ``replaykit distill --workers N`` against one worker, same buffer bytes.

Runs the real command line end to end (process start, data loading, job files, the exchange)
for each configuration, alternating them ``--repeats`` times so that a change in the machine's
load hits every configuration alike, and checks that every run wrote the same tensor bytes.

    flock /tmp/replaykit-bench.lock nice -n 0 python benchmarks/distributed_speedup.py \\
        --dataset mnist --ipc 10 --iterations 200 --repeats 2 --out benchmarks/results/distributed.json

Configurations: ``1w-default-threads`` (one process, torch's default intra-op threads),
``1w-1thread`` (one process, one thread: what each worker gets) and ``{N}w`` (N workers,
one thread each).
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
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "replaykit", *cli, "--out", str(out)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cli)} failed:\n{done.stderr[-3000:]}")
    with safe_open(str(out), framework="pt") as handle:
        header = json.loads(handle.metadata()["replaykit"])
    return {"wall_seconds": round(seconds, 2), "tensor_sha256": header["sha256"],
            "part_seconds": header["meta"]["part_seconds"], "distill_seconds": header["meta"]["distill_seconds"]}


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

    torch.set_num_threads(1)
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
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each run, wait up to this many seconds for other nice-0 CPU users to finish")
    p.add_argument("--probe-shape", help="also time one class of random images of this C,H,W (one thread), e.g. 3,64,64")
    p.add_argument("--probe-images", type=int, default=1300, help="real images in the probed class (ImageNet: ~1300)")
    p.add_argument("--probe-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", required=True, help="JSON file for the raw timings")
    args = p.parse_args(argv)
    if args.probe_only:  # the subprocess of --probe-shape
        shape = [int(v) for v in args.probe_shape.split(",")]
        print(json.dumps(_probe(shape, args.probe_images, args.method, args.ipc, args.iterations, args.seed)))
        return 0

    cli = ["distill", "--dataset", args.dataset, "--method", args.method, "--ipc", str(args.ipc), "--iterations",
           str(args.iterations), "--classes", args.classes, "--seed", str(args.seed), "--quiet"]
    base_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    configs = {
        "1w-default-threads": (["--workers", "1"], {k: v for k, v in base_env.items() if k != "OMP_NUM_THREADS"}),
        "1w-1thread": (["--workers", "1"], {**base_env, "OMP_NUM_THREADS": "1"}),
        f"{args.workers}w": (["--workers", str(args.workers)], base_env),
    }
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
    best = {name: min(r["wall_seconds"] for r in record["runs"] if r["config"] == name) for name in configs}
    record["best_wall_seconds"] = best
    parallel = f"{args.workers}w"
    record["speedup"] = {f"{parallel} over {name}": round(best[name] / best[parallel], 3) for name in configs if name != parallel}
    record["identical_tensors"] = len({r["tensor_sha256"] for r in record["runs"]}) == 1
    atomic_write_json(args.out, record)
    print(json.dumps({k: record[k] for k in ("best_wall_seconds", "speedup", "identical_tensors")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
