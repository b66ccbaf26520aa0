"""PROTOCOL part B: distilled-set quality of every registered method, next to the published figures.

For each dataset, IPC, method and parameterisation (a *cell*): distill the whole training set
(10 classes), then train fresh networks only on the buffer (decoded to full resolution) and
test them on the real test set (``replaykit.evaluate``): ConvNet-3 width 128 mean ± std over
5 networks x 300 epochs with DSA for every method, MLP and LeNet-5 for the cross-architecture
drop, and the privacy check (distance of each synthetic image to its nearest real training
image, next to a random real subset's).

    python benchmarks/distill_quality.py --quick                       # CI smoke (digits), under 2 minutes
    python benchmarks/distill_quality.py --datasets mnist --ipcs 10 --methods dm random --budget 1800 --workers 2
    python benchmarks/distill_quality.py --validation ...              # tune on a held-out tenth of the training set

Long runs are first-class: ``results.json`` and ``results.md`` in ``--out`` (default
``runs/distill_quality``) are rewritten atomically after every cell, and a rerun with the same
settings skips the cells already there (``--restart`` discards them). ``--workers N`` distills
the classes of the class-independent methods in N processes (``replaykit.distributed``).
Full-protocol rows are also upserted into ``benchmarks/results/distill_quality.json``.
Departures from PROTOCOL B (fewer networks or epochs, a narrower evaluation ConvNet, a
distillation time budget) are recorded in the JSON and printed above the table.
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin: on a shared 2-core machine spinning workers
# slow small convolutions down by an order of magnitude. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from replaykit import distill  # noqa: E402
from replaykit.data import DatasetNotFoundError, dataset_info, load_tensors  # noqa: E402
from replaykit.device import add_device_argument  # noqa: E402
from replaykit.evaluate import evaluate_buffer  # noqa: E402
from replaykit.fileio import (  # noqa: E402
    JSONFileError, atomic_write, atomic_write_bytes, atomic_write_checked_json, atomic_write_json, read_runs,
)
from replaykit.runtime import keep_freed_memory  # noqa: E402

PUBLISHED = {  # PROTOCOL B, ConvNet-3, IPC 1 / 10 / 50 (%)
    "mnist": {"DC": (91.7, 97.4, 98.8), "DSA": (88.7, 97.8, 99.2), "KIP": (90.1, 97.5, 98.4)},
    "fashion-mnist": {"DC": (70.5, 82.3, 83.6), "DSA": (70.6, 84.6, 88.7), "KIP": (73.8, 86.8, 87.8)},
    "cifar10": {"random": (14.4, 26.0, 43.4), "herding": (21.5, 31.6, 40.4), "DC": (28.3, 44.9, 53.9),
                "DSA": (28.8, 52.1, 60.6), "DM": (26.0, 48.9, 63.0), "MTT": (46.3, 65.3, 71.6)},
}
PROTOCOL = {"num_networks": 5, "epochs": 300, "width": 128}


def _accepted_options(name: str) -> set[str]:
    accepted: set[str] = set()
    for klass in distill.REGISTRY[name].__mro__:
        if "__init__" in vars(klass):
            accepted |= set(inspect.signature(klass.__init__).parameters)
    return accepted


def _method_options(name: str, args) -> dict[str, Any]:
    """Budget options for learned methods (those that take them); selection baselines take none."""
    accepted = _accepted_options(name)
    opts: dict[str, Any] = {}
    if args.budget is not None and "time_budget" in accepted:
        opts["time_budget"] = args.budget
    if args.iterations is not None and "iterations" in accepted:
        opts["iterations"] = args.iterations
    if args.quick:
        for key, value in (("width", 16), ("real_batch", 32), ("feature_epochs", 1), ("feature_width", 16)):
            if key in accepted:
                opts[key] = value
    return opts


def _load(name: str, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Train and evaluation tensors; with ``--validation`` the evaluation set is a held-out tenth of train."""
    x, y = load_tensors(name, train=True, root=args.data_root)
    if args.train_subset:
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: args.train_subset]
        x, y = x[keep], y[keep]
    if args.validation:
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))
        n_val = len(y) // 10
        return x[perm[n_val:]], y[perm[n_val:]], x[perm[:n_val]], y[perm[:n_val]], "validation (held-out tenth of train)"
    xt, yt = load_tensors(name, train=False, root=args.data_root)
    return x, y, xt, yt, "test"


def _pct(m: dict[str, float] | None) -> str:
    return "–" if m is None else f"{100 * m['mean']:.2f} ± {100 * m['std']:.2f}"


def _table(runs: list[dict[str, Any]], config: dict[str, Any]) -> str:
    lines = [f"Evaluation on the {config['eval_split']} set; {config['num_networks']} ConvNet-3 (width {config['width']}) x "
             f"{config['epochs']} epochs; cross-architecture: {', '.join(config['cross_networks']) or 'none'} "
             f"({config['cross_num_networks']} network(s) each). Machine: {config['machine']}."]
    if config["departures"]:
        lines.append("Departures from PROTOCOL B: " + "; ".join(config["departures"]) + ".")
    lines += ["", "| dataset | IPC | method | parameterisation (stored images/class) | distill s | ConvNet acc % | MLP drop | LeNet drop "
                  "| nearest-real median (syn / real subset) | published (ConvNet) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ev = r["evaluation"]
        drop = ev.get("drop", {})
        pub = PUBLISHED.get(r["dataset"], {})
        col = {1: 0, 10: 1, 50: 2}.get(r["ipc"])
        published = ", ".join(f"{k} {v[col]}" for k, v in pub.items()) if col is not None else ""
        priv = ev.get("privacy")
        priv_text = f"{priv['synthetic_median']:.2f} / {priv['real_subset_median']:.2f}" if priv else "–"
        drops = " | ".join(f"{100 * drop[a]:+.2f}" if a in drop else "–" for a in ("mlp", "lenet"))
        lines.append(
            f"| {r['dataset']} | {r['ipc']} | {r['method']} | {r.get('parameterisation', 'full')} ({r.get('stored_images_per_class', r['ipc'])}) "
            f"| {r['distill_seconds']:.1f} | {_pct(ev.get('convnet'))} | "
            f"{drops} | {priv_text} | {published} |"
        )
    return "\n".join(lines) + "\n"


def _label(run: dict[str, Any]) -> str:
    p = run.get("parameterisation", "full")
    return run["method"] if p == "full" else f"{run['method']} {p}"


def _bar_chart(runs: list[dict[str, Any]], dataset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in runs if r["dataset"] == dataset and "convnet" in r["evaluation"]]
    ipcs = sorted({r["ipc"] for r in rows})
    methods = sorted({_label(r) for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        means, errs = [], []
        for ipc in ipcs:
            match = [r for r in rows if r["ipc"] == ipc and _label(r) == m]
            means.append(100 * match[0]["evaluation"]["convnet"]["mean"] if match else 0)
            errs.append(100 * match[0]["evaluation"]["convnet"]["std"] if match else 0)
        ax.bar([i + j * width for i in range(len(ipcs))], means, width, yerr=errs, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ipcs))], [f"IPC {i}" for i in ipcs])
    ax.set_ylabel("ConvNet accuracy (%)")
    ax.set_title(f"{dataset}: training only on the distilled set")
    lowest = min((100 * r["evaluation"]["convnet"]["mean"] for r in rows), default=0.0)
    ax.set_ylim(max(0.0, 10 * (lowest // 10) - 10), 100)  # the differences that matter are a few points
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def dm_speed_bar(args, budget: float, long: float) -> dict[str, Any]:
    """The issue's speed bar: one two-class MNIST task (about 12 600 images) to 10 images per class.

    Runs ``dm`` under ``budget`` seconds and under a ``long`` budget, and ``random``, and
    evaluates each on the two classes' test images with the same evaluation settings.
    """
    x, y = load_tensors("mnist", train=True, root=args.data_root)
    xt, yt = load_tensors("mnist", train=False, root=args.data_root)
    keep, keep_t = y < 2, yt < 2
    x, y, xt, yt = x[keep], y[keep], xt[keep_t], yt[keep_t]
    rows = []
    for label, method, opts in (("random", "random", {}), (f"dm {budget:g} s", "dm", {"time_budget": budget}),
                                (f"dm {long:g} s", "dm", {"time_budget": long})):
        buf = distill.make(method, ipc=10, seed=args.seed, progress=not args.quiet, device=args.device, **opts).distill(
            x, y, num_classes=10, meta=dataset_info("mnist").meta())
        ev = evaluate_buffer(buf, xt, yt, networks=["convnet"], num_networks=args.num_networks, epochs=args.epochs,
                             width=args.width, seed=args.seed, progress=False, device=args.device)
        rows.append({"label": label, "method": method, "options": opts, "distill_seconds": buf.meta["distill_seconds"],
                     "iterations_done": buf.meta.get("iterations_done"), "convnet": ev["convnet"],
                     "per_network": ev["per_network"]["convnet"]})
        if not args.quiet:
            print(f"speed bar: {label}: {buf.meta['distill_seconds']:.1f} s, {_pct(ev['convnet'])} %", flush=True)
    return {"task": "MNIST classes 0,1 (12 665 images) -> IPC 10; 2-class test set (2 115 images)", "rows": rows,
            "train_images": int(len(y))}


def _speed_table(speed: dict[str, Any]) -> str:
    lines = ["", f"dm speed bar: {speed['task']}", "", "| run | distill s | iterations | ConvNet acc % |", "|---|---|---|---|"]
    for r in speed["rows"]:
        lines.append(f"| {r['label']} | {r['distill_seconds']:.1f} | {r['iterations_done'] or '–'} | {_pct(r['convnet'])} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke run: digits, IPC 1, tiny budgets, 1 small network")
    p.add_argument("--datasets", nargs="+", help="default: mnist fashion-mnist (+ cifar10 when present)")
    p.add_argument("--ipcs", nargs="+", type=int, help="default: 1 10 50")
    p.add_argument("--methods", nargs="+", help="default: every registered method")
    p.add_argument("--parameterisations", nargs="+",
                   help="'full' (default) and/or 'factorF': images stored at 1/F resolution for the methods that take "
                        "factor=, IPC full-resolution images' worth of bytes per class (F*F*IPC images)")
    p.add_argument("--workers", type=int, default=1,
                   help=f"distill the classes of {', '.join(PER_CLASS_METHODS)} and train the evaluation networks in this many processes (one per core)")
    p.add_argument("--seed", type=int, default=0, help="distillation and evaluation seed")
    p.add_argument("--budget", type=float, help="distillation time budget (s) per (method, IPC) for methods that take one")
    p.add_argument("--iterations", type=int, help="iterations for methods that take them")
    p.add_argument("--num-networks", type=int, default=PROTOCOL["num_networks"])
    p.add_argument("--epochs", type=int, default=PROTOCOL["epochs"])
    p.add_argument("--width", type=int, default=PROTOCOL["width"], help="evaluation ConvNet width")
    p.add_argument("--cross-networks", default="mlp,lenet", help="comma-separated; empty for none")
    p.add_argument("--cross-num-networks", type=int, default=PROTOCOL["num_networks"])
    p.add_argument("--no-privacy", action="store_true")
    p.add_argument("--validation", action="store_true", help="evaluate on a held-out tenth of the training set (for tuning)")
    p.add_argument("--train-subset", type=int, help="distill from a random subset of this many training images")
    p.add_argument("--data-root")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--dm-speed", nargs=2, type=float, metavar=("BUDGET", "LONG"),
                   help="also run the dm speed bar: MNIST classes 0 and 1 -> IPC 10 within BUDGET s, next to a LONG-s run")
    p.add_argument("--out", default="runs/distill_quality")
    p.add_argument("--restart", action="store_true", help="discard --out's results.json instead of resuming from it")
    p.add_argument("--export", default=str(Path(__file__).resolve().parent / "results" / "distill_quality.json"),
                   help="full-protocol rows are upserted into this committed JSON (default benchmarks/results/distill_quality.json)")
    p.add_argument("--no-export", action="store_true", help="do not touch the --export file")
    p.add_argument("--plot-export", action="store_true",
                   help="only redraw the accuracy plots of the --export file (beside it) and exit")
    p.add_argument("--quiet", action="store_true")
    add_device_argument(p, "distillation and the evaluation networks")
    args = p.parse_args(argv)
    if args.quick:
        args.datasets = args.datasets or ["digits"]
        args.ipcs = args.ipcs or [1]
        args.iterations = 10 if args.iterations is None else args.iterations
        if "--num-networks" not in (argv or sys.argv):
            args.num_networks = 1
        if "--epochs" not in (argv or sys.argv):
            args.epochs = 50
        if "--width" not in (argv or sys.argv):
            args.width = 16
        if "--cross-num-networks" not in (argv or sys.argv):
            args.cross_num_networks = 1
        args.parameterisations = args.parameterisations or ["full", "factor2"]
    args.ipcs = args.ipcs or [1, 10, 50]
    args.parameterisations = args.parameterisations or ["full"]
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    standalone = [m for m in distill.available() if not getattr(distill.REGISTRY[m], "needs_learner", False)]
    args.methods = args.methods or standalone
    unknown = [m for m in args.methods if m not in distill.REGISTRY]
    if unknown:
        p.error(f"unknown method(s) {unknown}; available: {distill.available()}")
    learner_bound = [m for m in args.methods if m not in standalone]
    if learner_bound:
        p.error(f"method(s) {learner_bound} work on a continual learner; this protocol distils a dataset without one "
                f"(available here: {standalone})")
    return args


#: Methods whose classes never interact (each class has its own random streams), so that
#: ``--workers`` may distill their classes in parallel processes with the same result.
PER_CLASS_METHODS = ("dm", "dm-multi")
#: Settings that change a cell's numbers: a results.json written with others cannot be resumed.
_FINGERPRINT = ("seed", "budget", "iterations", "num_networks", "epochs", "width", "cross_networks",
                "cross_num_networks", "quick", "eval_split", "train_subset", "no_privacy")


def _factor(parameterisation: str) -> int:
    """``full`` -> 1, ``factorF`` -> F (images stored at 1/F resolution, IDC multi-formation)."""
    if parameterisation == "full":
        return 1
    if parameterisation.startswith("factor") and parameterisation[6:].isdigit() and int(parameterisation[6:]) >= 2:
        return int(parameterisation[6:])
    raise ValueError(f"unknown parameterisation {parameterisation!r}; use 'full' or 'factorF' with F >= 2 (e.g. factor2)")


def _cell_key(run: dict[str, Any]) -> tuple:
    return run["dataset"], run["method"], run["ipc"], run.get("parameterisation", "full")


def _resume(path: Path, config: dict[str, Any], restart: bool) -> list[dict[str, Any]]:
    """Finished cells of an earlier run with the same settings (none with ``restart``)."""
    if restart or not path.exists():
        return []
    doc, runs = read_runs(path, ("dataset", "method", "ipc"))
    old = doc.get("config", {})
    if not isinstance(old, dict):
        raise JSONFileError(f"{path}: 'config' must be an object")
    changed = [k for k in _FINGERPRINT if old.get(k) != config.get(k)]
    if changed:
        raise ValueError(f"{path} was written with other settings ({', '.join(f'{k}: {old.get(k)!r} -> {config.get(k)!r}' for k in changed)}); "
                         "pass --restart to discard it or choose another --out")
    return list(runs)


def _distill_cell(method: str, opts: dict[str, Any], ipc: int, x, y, num_classes: int, meta: dict, args) -> Any:
    """One cell's buffer: per class over ``--workers`` processes for class-independent methods, else in one call."""
    if args.workers > 1 and method in PER_CLASS_METHODS:
        from replaykit import distributed  # lazily: only --workers needs torch.distributed

        classes = torch.unique(y).tolist()
        job_opts = dict(opts, device=args.device)
        if "time_budget" in job_opts:  # the cell's wall-clock budget, shared by the classes each worker runs in turn
            job_opts["time_budget"] = job_opts["time_budget"] * args.workers / len(classes)
        jobs = [distributed.ClassJob(method, job_opts, ipc, args.seed, x[y == c], y[y == c], num_classes, meta) for c in classes]
        return distributed.merge_parts(distributed.distill_per_class(jobs, workers=args.workers), workers=args.workers)
    return distill.make(method, ipc=ipc, seed=args.seed, progress=not args.quiet, device=args.device, **opts).distill(x, y, num_classes=num_classes, meta=meta)


def _export_rows(path: Path, runs: list[dict[str, Any]], config: dict[str, Any]) -> None:
    """Upsert full-protocol rows into the committed machine-readable copy (``benchmarks/results/``)."""
    doc = json.loads(path.read_text()) if path.exists() else {"protocol": "PROTOCOL B", "rows": []}
    rows = {(r["dataset"], r["method"], r["ipc"], r["parameterisation"], r.get("budget"), r.get("iterations"), r.get("seed")): r
            for r in doc["rows"]}
    for run in runs:
        ev = run["evaluation"]
        row = {"dataset": run["dataset"], "method": run["method"], "ipc": run["ipc"], "parameterisation": run["parameterisation"],
               "stored_images_per_class": run["stored_images_per_class"], "distill_seconds": run["distill_seconds"],
               "cores": os.cpu_count(), "workers": run["workers"], "threads": config["threads"], "budget": config["budget"],
               "iterations": config["iterations"], "iterations_done": run["iterations_done"], "seed": run["seed"],
               "eval_networks": config["num_networks"], "eval_width": config["width"], "eval_epochs": config["epochs"],
               "accuracies": ev["per_network"]["convnet"], "mean": ev["convnet"]["mean"], "std": ev["convnet"]["std"],
               "eval_seconds_per_network": ev["seconds"]["convnet"],
               "cross": {a: {"accuracies": ev["per_network"][a], "drop": ev["drop"][a]} for a in ev.get("drop", {})},
               "privacy": ev.get("privacy"), "date": run["date"], "command": config["command"], "load_average": run["load_average"]}
        rows[(row["dataset"], row["method"], row["ipc"], row["parameterisation"], row["budget"], row["iterations"], row["seed"])] = row
    doc["rows"] = sorted(rows.values(), key=lambda r: (r["dataset"], r["ipc"], r["method"], r["parameterisation"], str(r["budget"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)


def plot_exported(path: Path) -> list[Path]:
    """Accuracy per IPC and method for every dataset in the committed JSON, written beside it
    (``distill_quality_accuracy_<dataset>.png``). Where a cell was run at several budgets the plot shows the run
    with the most distillation time (all of them stay in the JSON and RESULTS.md)."""
    rows = json.loads(path.read_text())["rows"]
    chosen: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["dataset"], r["ipc"], r["method"], r["parameterisation"])
        if key not in chosen or r["distill_seconds"] > chosen[key]["distill_seconds"]:
            chosen[key] = r
    runs = [{"dataset": r["dataset"], "ipc": r["ipc"], "method": r["method"], "parameterisation": r["parameterisation"],
             "evaluation": {"convnet": {"mean": r["mean"], "std": r["std"]}}} for r in chosen.values()]
    written = []
    for dataset in sorted({r["dataset"] for r in runs}):
        target = path.parent / f"distill_quality_accuracy_{dataset}.png"
        _bar_chart(runs, dataset, target)
        written.append(target)
    return written


def protocol_departures(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(departures of the evaluation from PROTOCOL B, every departure). Only the first kind keeps a run's rows out of
    ``benchmarks/results/``: a distillation time budget is a stated setting of the row (recorded with it), not a
    different evaluation."""
    evaluation = []
    if args.num_networks != PROTOCOL["num_networks"]:
        evaluation.append(f"{args.num_networks} ConvNet(s) instead of 5")
    if args.epochs != PROTOCOL["epochs"]:
        evaluation.append(f"{args.epochs} epochs instead of 300 (lr x0.1 at half)")
    if args.width != PROTOCOL["width"]:
        evaluation.append(f"evaluation ConvNet width {args.width} instead of 128")
    departures = list(evaluation)
    if args.budget is not None:
        departures.append(f"distillation time budget {args.budget:g} s per (method, IPC) on a {os.cpu_count()}-core CPU")
    if args.train_subset:
        departures.append(f"distilled from a random {args.train_subset}-image subset of the training set")
    return evaluation, departures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_export:
        for target in plot_exported(Path(args.export)):
            print(f"wrote {target}")
        return 0
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    if args.datasets is None:
        args.datasets = ["mnist", "fashion-mnist"]
        try:
            load_tensors("cifar10", train=False, root=args.data_root)
            args.datasets.append("cifar10")
        except DatasetNotFoundError:
            pass
    for name in args.datasets:
        try:
            dataset_info(name)
            load_tensors(name, train=False, root=args.data_root)
        except (DatasetNotFoundError, ValueError) as exc:
            print(f"distill_quality: dataset {name!r} is not available: {exc}", file=sys.stderr)
            return 2
    try:
        factors = {p: _factor(p) for p in args.parameterisations}
    except ValueError as exc:
        print(f"distill_quality: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cross = [n for n in args.cross_networks.split(",") if n.strip()]
    evaluation_departures, departures = protocol_departures(args)
    config = {
        "datasets": args.datasets, "ipcs": args.ipcs, "methods": args.methods, "parameterisations": args.parameterisations,
        "seed": args.seed, "budget": args.budget, "iterations": args.iterations, "num_networks": args.num_networks,
        "epochs": args.epochs, "width": args.width, "cross_networks": cross, "cross_num_networks": args.cross_num_networks,
        "quick": args.quick, "eval_split": "validation" if args.validation else "test", "train_subset": args.train_subset,
        "no_privacy": args.no_privacy, "departures": departures, "threads": args.threads, "workers": args.workers, "device": args.device,
        "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU" if not torch.cuda.is_available() else "GPU",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    full_protocol = not evaluation_departures and not args.quick and not args.validation and not args.train_subset
    export = None if args.no_export or not full_protocol else Path(args.export)
    try:
        runs = _resume(out / "results.json", config, args.restart)
    except ValueError as exc:
        print(f"distill_quality: {exc}", file=sys.stderr)
        return 2
    done = {_cell_key(r) for r in runs}
    speed = dm_speed_bar(args, *args.dm_speed) if args.dm_speed else None

    def save() -> None:  # after every cell, atomically: an interrupted run resumes from here
        atomic_write_checked_json(out / "results.json", {"config": config, "runs": runs, "dm_speed": speed})
        atomic_write_bytes(out / "results.md", (_table(runs, config) + (_speed_table(speed) if speed else "")).encode("utf-8"))
        if export is not None:
            _export_rows(export, runs, config)
            plot_exported(export)

    save()
    for name in args.datasets:
        x, y, xe, ye, split = _load(name, args)
        info = dataset_info(name)
        meta = info.meta()
        for ipc in args.ipcs:
            for method in args.methods:
                for parameterisation, factor in factors.items():
                    if (name, method, ipc, parameterisation) in done:
                        if not args.quiet:
                            print(f"{name} ipc={ipc} {method} {parameterisation}: done in an earlier run, kept", flush=True)
                        continue
                    opts = _method_options(method, args)
                    if factor > 1:
                        if "factor" not in _accepted_options(method):
                            continue  # only the parameterised methods have a low-resolution form
                        opts["factor"] = factor
                    stored_ipc = ipc * factor * factor  # equal bytes: IPC full-resolution images' worth per class
                    started = time.perf_counter()
                    buffer = _distill_cell(method, opts, stored_ipc, x, y, info.num_classes, meta, args)
                    wall = time.perf_counter() - started
                    suffix = "" if factor == 1 else f"_{parameterisation}"
                    buffer.save(out / f"{name}_ipc{ipc}_{method}{suffix}.safetensors")
                    ev = evaluate_buffer(buffer, xe, ye, networks=["convnet"], num_networks=args.num_networks, epochs=args.epochs,
                                         width=args.width, train_images=None if args.no_privacy else x, seed=args.seed,
                                         progress=not args.quiet, workers=args.workers, device=args.device)
                    if cross:
                        ev_cross = evaluate_buffer(buffer, xe, ye, networks=cross, num_networks=args.cross_num_networks,
                                                   epochs=args.epochs, width=args.width, seed=args.seed, progress=not args.quiet,
                                                   workers=args.workers, device=args.device)
                        for arch in cross:
                            ev[arch] = ev_cross[arch]
                            ev["per_network"][arch] = ev_cross["per_network"][arch]
                            ev["seconds"][arch] = ev_cross["seconds"][arch]
                        ev["drop"] = {a: ev["convnet"]["mean"] - ev[a]["mean"] for a in cross}
                    run = {"dataset": name, "ipc": ipc, "method": method, "parameterisation": parameterisation,
                           "stored_images_per_class": stored_ipc, "seed": args.seed, "options": opts,
                           "workers": args.workers if method in PER_CLASS_METHODS else 1, "distill_seconds": round(wall, 3),
                           "distill_cpu_seconds": buffer.meta["distill_seconds"], "iterations_done": buffer.meta.get("iterations_done"),
                           "stopped_by": buffer.meta.get("stopped_by"), "evaluation": ev,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "load_average": [round(v, 2) for v in os.getloadavg()]}
                    runs.append(run)
                    if not args.quiet:
                        print(f"{name} ipc={ipc} {method} {parameterisation}: {wall:.1f} s, ConvNet {_pct(ev['convnet'])} %", flush=True)
                    save()
        rows = [r for r in runs if r["dataset"] == name]
        if not rows:
            continue
        _bar_chart(runs, name, out / f"accuracy_{name}.png")
        best = max((r for r in rows if r["ipc"] == max(r["ipc"] for r in rows)), key=lambda r: r["evaluation"]["convnet"]["mean"])
        from replaykit.buffer import SyntheticBuffer
        from replaykit.viz import save_buffer_grid

        suffix = "" if best.get("parameterisation", "full") == "full" else f"_{best['parameterisation']}"
        save_buffer_grid(SyntheticBuffer.load(out / f"{name}_ipc{best['ipc']}_{best['method']}{suffix}.safetensors"), out / f"best_{name}.png")
    print(_table(runs, config) + (_speed_table(speed) if speed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
