"""Where does distillation earn its bytes? Class-incremental replay (PROTOCOL A) over a sweep of byte budgets.

At every budget the distilled (or hybrid) buffer runs beside its **twins**: the same pipeline (codec,
held logits, mixing, recompression, bytes) holding real images chosen at random or by herding, and
beside raw replay at the same bytes (Avalanche's ReplayPlugin, DER with its logits counted, JPEG-coded
exemplars). A distilled row without its twins proves nothing about distillation.

    python benchmarks/bytes_sweep.py --quick                               # CI smoke, about a minute
    python benchmarks/bytes_sweep.py --datasets mnist fashion-mnist --seeds 0 1 2 --jobs 2 --resume
    python benchmarks/bytes_sweep.py --validation ...                      # choose settings here, never on test

Writes ``results.json`` (one row per run, rewritten after each so ``--resume`` continues), ``results.md``
(mean ± std over seeds per budget) and ``lead_vs_bytes.png`` (best distilled or hybrid row minus the best
row holding real images, per dataset) to ``--out``; ``--copy-json`` also writes the rows there
(``benchmarks/results/bytes_sweep.json`` for full runs).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from class_incremental import _device_words, run_cells  # noqa: E402  (a sibling script, not a package)
from make_results import best_lead, mean_std, row_families, sweep_summary  # noqa: E402  (how the results page groups rows into table rows)

from replaykit.codecs import image_cost_bytes  # noqa: E402
from replaykit.continual import RunConfig, parse_spec  # noqa: E402
from replaykit.data import DatasetNotFoundError, dataset_info, load_tensors  # noqa: E402
from replaykit.device import add_device_argument  # noqa: E402
from replaykit.fileio import JSONFileError, atomic_write, atomic_write_checked_json, read_checked_json  # noqa: E402
from replaykit.runtime import keep_freed_memory  # noqa: E402

#: Budgets as raw uint8 images (+ 1-byte label) per class over 10 classes: 1/4, 1/2, 1, 2.5, 5, 10, 20.
IMAGES_PER_CLASS = (0.25, 0.5, 1, 2.5, 5, 10, 20)
CIFAR_IMAGES_PER_CLASS = (1, 2.5, 10)
#: The pipeline every distilled, hybrid and twin row shares: JPEG q2 codes with the headers held once,
#: the learner's logits (int8 + float16 scale), half of every training mini-batch shown through the codec,
#: held classes shrink by keeping their first images.
PIPELINE = "uint8:factor=2:bits=2:logits=1:mix=0.5"
#: Other pipelines random real images run through too: JPEG q2 with held logits is the strongest real row at 1-10
#: raw images per class (benchmarks/log/JOURNAL.md), so the distilled row must beat it, not only its own twins.
REAL_PIPELINES = ("jpeg:quality=2:logits=1:mix=0.5",)
RECOMPRESS = "prefix"
#: Distilled rows: method and its options after ``core=`` (the distilled share of the final quota).
DISTILLED = ("dm:core=1:iterations=500",)
REAL_SELECTIONS = ("random", "herding")


def budget_bytes(dataset: str, images_per_class: float) -> int:
    """The bytes of ``images_per_class`` raw uint8 images with a one-byte label, for every class."""
    info = dataset_info(dataset)
    return int(math.floor(images_per_class * info.num_classes * image_cost_bytes(info.in_shape) + 0.5))


def pipeline_text(pipeline: str, recompress: str) -> str:
    """The canonical text of a pipeline: what a distilled row and its twins must share exactly."""
    storage, *pairs = pipeline.split(":")
    return ":".join([storage, *sorted(pairs), f"recompress={recompress}"])


def sweep_rows(dataset: str, budget: int, distilled: tuple[str, ...], pipeline: str, recompress: str,
               baselines: bool = True, real_pipelines: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Every row of one budget: ``{"images", "pipeline", "spec"}``, the spec in :func:`parse_spec`'s text form.

    ``real_pipelines``: other pipelines to run random real images through as well (the strongest real
    rows may use another codec than the distilled one).
    """
    info = dataset_info(dataset)
    raw = image_cost_bytes(info.in_shape)  # a uint8 image and its one-byte label
    shared = pipeline_text(pipeline, recompress)
    rows = []
    for entry in distilled:
        method, *options = entry.split(":")
        core = next((float(o.split("=", 1)[1]) for o in options if o.startswith("core=")), None)
        family = "hybrid" if core is not None and core < 1 else "distilled"
        rows.append({"images": f"{family}:{method}", "pipeline": shared,
                     "spec": ":".join([f"distilled:{budget}B:{method}", pipeline, f"recompress={recompress}", *options])})
    for method in REAL_SELECTIONS:
        rows.append({"images": method, "pipeline": shared, "spec": f"distilled:{budget}B:{method}:{pipeline}:recompress={recompress}"})
    for other in real_pipelines:
        if pipeline_text(other, recompress) == shared:
            continue  # the random twin already runs through it
        rows.append({"images": "random", "pipeline": pipeline_text(other, recompress), "row": f"random ({other})",
                     "spec": f"distilled:{budget}B:random:{other}:recompress={recompress}"})
    if baselines:
        replay_m = budget // raw
        der_m = budget // (raw + 4 * info.num_classes)  # DER holds float32 logits too
        if replay_m >= 1:
            rows.append({"images": "replay", "pipeline": "uint8 reservoir (Avalanche ReplayPlugin)", "spec": f"replay:{replay_m}"})
        if der_m >= 1:
            rows.append({"images": "der", "pipeline": "uint8 + float32 logits (Avalanche DER)", "spec": f"der:{der_m}"})
        rows.append({"images": "jpeg", "pipeline": "jpeg:mix=0.5:quality=2 (real exemplars)", "spec": f"jpeg:{budget}B:quality=2:mix=0.5"})
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[tuple[str, int, int], dict[str, tuple[float, float, int]]]:
    """(dataset, epochs, budget) -> images family -> (mean %, std %, seeds), families as the results page names them."""
    out: dict[tuple[str, int, int], dict[str, tuple[float, float, int]]] = {}
    for key, families in sweep_summary(rows, split=None).items():
        out[key] = {}
        for family, runs in families.items():
            mean, std = mean_std(r["final_accuracy"] for r in runs)
            out[key][family] = (100 * mean, 100 * std, len(runs))
    return out


def lead(families: dict[str, tuple[float, float, int]]) -> float | None:
    """Best distilled or hybrid mean minus the best mean of a row holding real images (``None`` if either is missing)."""
    return best_lead({f: m for f, (m, _, _) in families.items()})


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    summ = summary(rows)
    bytes_of = defaultdict(list)
    for r, family in zip(rows, row_families(rows)):
        bytes_of[(r["dataset"], r["epochs"], r["budget_bytes"], family)].append((r["memory_bytes"], r["memory_images"]))
    for dataset, epochs in sorted({(d, e) for d, e, _ in summ}):
        budgets = sorted(b for d, e, b in summ if (d, e) == (dataset, epochs))
        families = sorted({f for b in budgets for f in summ[(dataset, epochs, b)]})
        lines += [f"### {dataset}, {epochs} epoch(s) per experience: final accuracy % (mean ± std over seeds; images held)", "",
                  "| budget B (raw img/class) | " + " | ".join(families) + " | distilled - best real |",
                  "|---|" + "---:|" * (len(families) + 1)]
        per_image = dataset_info(dataset).num_classes * image_cost_bytes(dataset_info(dataset).in_shape)
        for b in budgets:
            cells = []
            for f in families:
                if f not in summ[(dataset, epochs, b)]:
                    cells.append("-")
                    continue
                mean, std, n = summ[(dataset, epochs, b)][f]
                held = bytes_of[(dataset, epochs, b, f)]
                cells.append(f"{mean:.2f} ± {std:.2f} (n={n}; {min(i for _, i in held)}-{max(i for _, i in held)} img, ≤{max(m for m, _ in held):,} B)")
            gap = lead(summ[(dataset, epochs, b)])
            lines.append(f"| {b:,} ({b / per_image:.3g}) | " + " | ".join(cells) + f" | {'-' if gap is None else f'{gap:+.2f}'} |")
        lines.append("")
    return "\n".join(lines)


def lead_plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Best distilled/hybrid minus best real-image row vs bytes per class, one line per dataset and epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summary(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for dataset, epochs in sorted({(d, e) for d, e, _ in summ}):
        points = [(b / dataset_info(dataset).num_classes, lead(summ[(d, e, b)])) for d, e, b in sorted(summ) if (d, e) == (dataset, epochs)]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{dataset}, {epochs} ep")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per class")
    ax.set_ylabel("best distilled/hybrid − best real-image row (points)")
    ax.set_title("Where distillation earns its bytes (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", nargs="+", type=int, default=[1])
    parser.add_argument("--images-per-class", nargs="+", type=float, default=None,
                        help=f"budgets as raw images per class (default {IMAGES_PER_CLASS}; CIFAR-10 {CIFAR_IMAGES_PER_CLASS})")
    parser.add_argument("--distilled", nargs="*", default=list(DISTILLED),
                        help="distilled rows as METHOD[:key=value...] (core=<share> < 1 makes it a hybrid row)")
    parser.add_argument("--pipeline", default=PIPELINE, help="storage and options every distilled row and its twins share")
    parser.add_argument("--recompress", default=RECOMPRESS, choices=["select", "prefix"])
    parser.add_argument("--real-pipelines", nargs="*", default=list(REAL_PIPELINES),
                        help="other pipelines random real images also run through (their rows count as real rows)")
    parser.add_argument("--no-baselines", action="store_true", help="only the distilled rows and their twins")
    parser.add_argument("--only", nargs="*", default=None, help="run only these images families (e.g. random herding)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None, help="run one seed (overrides --seeds)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--validation", action="store_true", help="evaluate on a held-out tenth of the training set (for tuning)")
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--test-per-class", type=int, default=None)
    parser.add_argument("--out", default="runs/bytes_sweep")
    parser.add_argument("--copy-json", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quick", action="store_true", help="CI smoke: small MNIST subsets, two budgets, one seed, few iterations")
    parser.add_argument("--quiet", action="store_true")
    add_device_argument(parser, "every strategy trains and distills")
    args = parser.parse_args(argv)

    seeds = [args.seed] if args.seed is not None else args.seeds
    distilled = tuple(args.distilled)
    if args.quick:
        seeds, args.datasets = seeds[:1], ["mnist"]
        args.images_per_class = args.images_per_class or [1]
        args.train_per_class, args.test_per_class = args.train_per_class or 60, args.test_per_class or 30
        args.width = min(args.width, 16)
        distilled = ("dm:core=1:iterations=5:real_batch=16",)
    for name in args.datasets:
        try:
            load_tensors(name, train=False, root=args.data_root)
        except DatasetNotFoundError as exc:
            raise SystemExit(f"bytes_sweep: dataset {name!r} is not available: {exc}") from None
    threads = 1 if args.jobs > 1 else 2
    torch.set_num_threads(threads)
    keep_freed_memory()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    rows: list[dict[str, Any]] = read_checked_json(results_path).get("rows", []) if args.resume and results_path.is_file() else []
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"dataset", "seed", "epochs", "spec"} <= set(r) for r in rows):
        raise JSONFileError(f"{results_path}: 'rows' must be a list of objects with dataset, seed, epochs and spec")
    done = {(r["dataset"], r["seed"], r["epochs"], r["spec"]) for r in rows}
    cells, about = [], {}
    for epochs in args.epochs:
        for seed in seeds:  # seed by seed: a partial run stays balanced
            for dataset in args.datasets:
                per_class = args.images_per_class or (CIFAR_IMAGES_PER_CLASS if dataset == "cifar10" else IMAGES_PER_CLASS)
                for ipc in per_class:
                    budget = budget_bytes(dataset, ipc)
                    for row in sweep_rows(dataset, budget, distilled, args.pipeline, args.recompress, not args.no_baselines,
                                          tuple(args.real_pipelines)):
                        if args.only is not None and row["images"] not in args.only and row["images"].split(":")[0] not in args.only:
                            continue
                        if (dataset, seed, epochs, row["spec"]) in done:
                            continue
                        cfg = RunConfig(dataset=dataset, seed=seed, epochs=epochs, width=args.width, train_per_class=args.train_per_class,
                                        test_per_class=args.test_per_class, data_root=args.data_root, validation=args.validation,
                                        device=args.device)
                        spec = parse_spec(row["spec"])
                        about[(dataset, seed, epochs, spec.identity)] = dict(row, budget_bytes=budget)
                        cells.append((cfg, spec))
    config = {"command": " ".join(["python benchmarks/bytes_sweep.py", *(argv if argv is not None else sys.argv[1:])]),
              "width": args.width, "pipeline": pipeline_text(args.pipeline, args.recompress), "distilled": list(distilled),
              "real_pipelines": list(args.real_pipelines), "device": args.device,
              "evaluated_on": "validation split of train" if args.validation else "test set", "quick": args.quick,
              "train_per_class": args.train_per_class, "test_per_class": args.test_per_class, "jobs": args.jobs, "threads_per_job": threads}
    start = time.perf_counter()

    def record_done(record: dict[str, Any]) -> None:
        row = about[(record["dataset"], record["seed"], record["epochs"], record["identity"])]
        rows.append({
            "dataset": record["dataset"], "seed": record["seed"], "epochs": record["epochs"], "budget_bytes": row["budget_bytes"],
            "memory_bytes": record["memory_bytes"], "memory_images": record["memory_images"], "images": row["images"],
            "pipeline": row["pipeline"], "final_accuracy": record["final_accuracy"], "distill_seconds": round(sum(record["distill_seconds"]), 3),
            "spec": row["spec"], "label": record["label"], "forgetting": record["forgetting"], "total_seconds": record["total_seconds"],
            "evaluated_on": config["evaluated_on"], **({"row": row["row"]} if "row" in row else {}),
        })
        if not args.quiet:
            print(f"{record['dataset']} {record['epochs']}ep seed {record['seed']} {row['budget_bytes']} B {row['images']}: "
                  f"{100 * record['final_accuracy']:.2f} % ({record['memory_images']} img, {record['memory_bytes']} B, "
                  f"distill {sum(record['distill_seconds']):.0f} s, run {record['total_seconds']:.0f} s)", flush=True)
        atomic_write_checked_json(results_path, _document(config, rows))

    run_cells(cells, args.jobs, threads, record_done)
    document = _document(config, rows)
    document["wall_seconds_this_invocation"] = round(time.perf_counter() - start, 1)
    atomic_write_checked_json(results_path, document)
    if args.copy_json:
        atomic_write_checked_json(Path(args.copy_json), document)
    text = table(rows)
    atomic_write(out / "results.md", lambda tmp: tmp.write_text(text))
    plot = lead_plot(rows, out / "lead_vs_bytes.png")
    print(text)
    print(f"wrote {results_path}, {out / 'results.md'}" + (f", {plot}" if plot else ""))
    return 0


def _document(config: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"benchmark": "bytes_sweep (PROTOCOL A over byte budgets)",
            "machine": f"{platform.machine()} CPU, {platform.processor() or 'unknown'}, {_device_words(config.get('device', 'cpu'))}",
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "command": config.get("command"), "config": config, "rows": rows}


if __name__ == "__main__":
    sys.exit(main())
