"""Writes ``benchmarks/RESULTS.md`` and README's results table from the committed ``benchmarks/results/*.json``.

    python benchmarks/make_results.py            # rewrite both after a benchmark updated its JSON
    python benchmarks/make_results.py --check    # exit 1 when either is out of date (what the test does)

Why a script: figures copied by hand drift from the runs they came from. Every figure here is read from a
JSON file; a file that is absent gives one line saying that benchmark has not been run. Hand-written prose
is kept in ``TEXT`` and states no figures. Standard library only, so it runs in a second.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from replaykit.fileio import atomic_write, read_checked_json  # noqa: E402  (standard library only)

RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
README = HERE.parent / "README.md"
README_BEGIN = "<!-- results table: written by benchmarks/make_results.py from benchmarks/results/bytes_sweep.json -->"
README_END = "<!-- end of results table -->"
MAX_LINES = 300

#: Pixels of one image per dataset: a budget is shown as raw uint8 images (+ 1-byte label) per class too.
PIXELS = {"mnist": 784, "fashion-mnist": 784, "cifar10": 3072, "digits": 64}
DATASET_NAMES = {"mnist": "Split-MNIST", "fashion-mnist": "Split-Fashion-MNIST", "cifar10": "Split-CIFAR-10"}
#: Row order of the class-incremental tables; kinds not listed follow in name order.
KIND_ORDER = ("naive", "joint", "replay", "class-balanced", "herding", "gdumb", "der", "downsample", "jpeg", "distilled")
#: Row order of the bytes sweep (``images`` of a row); twins are the rows holding real images through the same pipeline.
FAMILY_ORDER = ("distilled", "hybrid", "random", "herding", "replay", "der", "jpeg")
#: Bytes-sweep families that hold real images: the lead is measured against the best of them.
REAL_FAMILIES = ("random", "herding", "replay", "der", "jpeg")
#: Methods that select real images: a "distilled" buffer filled by them is a twin, not a distilled row (in the bytes
#: sweep: the twins of the distilled row that shares their pipeline).
SELECTIONS = ("random", "herding", "kcenter")
#: README shows the sweep at these budgets (raw images per class): the protocol's headline and a tenth of it.
README_IMAGES_PER_CLASS = (1, 10)

TEXT = {
    "intro": [  # one line per paragraph: the page is capped at MAX_LINES
        "Written by `python benchmarks/make_results.py` from the JSON files in `benchmarks/results/`; do not edit by hand "
        "(`tests/benchmarks/test_make_results.py` fails when this page and the JSON disagree). How every figure is "
        "measured: [PROTOCOL.md](PROTOCOL.md). The dated journal of how these results were reached, including "
        "superseded runs: [log/JOURNAL.md](log/JOURNAL.md).",
        "",
        "Accuracy is % on the real test set; `a ± b` is the mean and standard deviation (population, as the benchmark "
        "scripts compute it) over the seeds or networks named; *bytes* are everything a buffer holds (pixels at their "
        "stored precision, labels, logits, codec state), *images* how many images those bytes hold.",
    ],
    "class_incremental": "Five experiences of two classes, one head, ConvNet-3; every strategy in a table has the same "
                         "epochs and network. Forgetting is Avalanche's average forgetting, in points.",
    "bytes_sweep": "Every distilled row runs beside its **twins**: the same pipeline (codec, held logits, mixing, "
                   "recompression, bytes) holding random or herding-selected real images. *lead* = best distilled or "
                   "hybrid row minus the best row holding real images (twins, other real pipelines, ReplayPlugin, "
                   "DER, JPEG exemplars); a positive lead is what distillation earns at that budget.",
    "distill_quality": "A fresh ConvNet-3 (width 128) is trained on the distilled set alone and tested on the real "
                       "test set; the MLP and LeNet-5 columns give how many points the same set loses on those "
                       "networks. IPC counts full-resolution images' worth of bytes per class; `factor2` stores "
                       "four times as many half-resolution images in them.",
    "edge": "The device side runs onnxruntime and numpy only (torch blocked). Step times are medians of a "
            "32 new + 32 replayed step; parity is the largest parameter difference after one step from the same "
            "state (lr 0.01), beside PyTorch's own spread (oneDNN on vs off). These tables show the mean ± sample "
            "std over seeds that `edge_retrain.py` records.",
    "faults": "Every file a user may receive is mutated and loaded; writers are killed mid-write; a device "
              "process runs many rounds and meets hostile inputs under its memory cap.",
    "distributed": "Distillation with one class per job, sharded over local worker processes.",
    "gpu": "The CUDA check: the user path on a GPU beside the committed CPU rows, distillation speed, the "
           "`cuda`-marked tests.",
}


# ----------------------------------------------------------------------------------------------- small helpers
def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and population standard deviation (what ``numpy.std`` gives, as the benchmark scripts use)."""
    v = [float(x) for x in values]
    m = math.fsum(v) / len(v)
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in v) / len(v))


def pct(m: float, s: float | None = None) -> str:
    return f"{100 * m:.2f}" if s is None else f"{100 * m:.2f} ± {100 * s:.2f}"


def span(values: Iterable[int]) -> str:
    v = sorted(set(int(x) for x in values))
    return f"{v[0]:,}" if len(v) == 1 else f"{v[0]:,}-{v[-1]:,}"


def stat(d: Any, scale: float = 1.0, digits: int = 2) -> str:
    """A recorded ``{"mean", "std"}`` as text, ``-`` when absent."""
    if not isinstance(d, dict) or d.get("mean") is None:
        return "-"
    return f"{scale * d['mean']:.{digits}f} ± {scale * (d.get('std') or 0.0):.{digits}f}"


def num(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def dataset_name(key: str) -> str:
    return DATASET_NAMES.get(key, key)


def command_text(cmd: str) -> str:
    """A recorded command with the machine's own paths cut to repository-relative ones."""
    cmd = re.sub(r"(?<!\S)\S*/python3?(?=\s)", "python", cmd)
    cmd = re.sub(r"(?<![\w.])/\S*?/(?=(benchmarks|runs|replaykit|edge|tests)/)", "", cmd)
    cmd = re.sub(r"(?<!\S)/\S*/([^/\s]+)", r"<scratch>/\1", cmd)  # a scratch folder outside the repository
    return cmd if cmd.startswith(("python", "flock", "nice", "replaykit", "torchrun")) else f"python benchmarks/{cmd}" \
        if cmd.split(" ", 1)[0].endswith(".py") and "/" not in cmd.split(" ", 1)[0] else cmd


def recorded(doc: dict[str, Any]) -> str:
    """One line: when, where and under what load a document was recorded (only what it holds)."""
    parts = []
    date = doc.get("date") or doc.get("date_utc")
    if date:
        parts.append(f"date {date}")
    machine = doc.get("machine") or doc.get("machine_note")
    if machine:
        parts.append(f"machine: {machine}")
    load = doc.get("load_average_before_after")
    if load:
        parts.append("load average before / after: " + " / ".join(", ".join(f"{x:.2f}" for x in la) for la in load))
    elif doc.get("uptime_before"):
        parts.append(f"load before / after: {doc['uptime_before'].split('load average: ')[-1]} / "
                     f"{doc.get('uptime_after', '?').split('load average: ')[-1]}")
    if doc.get("load_note"):
        parts.append(f"load: {doc['load_note']}")
    seconds = doc.get("seconds") or doc.get("wall_seconds_this_invocation")
    if seconds:
        parts.append(f"wall time {seconds:,.0f} s" + (" (last invocation)" if "wall_seconds_this_invocation" in doc else ""))
    return "Recorded: " + ("; ".join(parts) if parts else "no date, machine or load in the JSON") + "."


def command_line(doc: dict[str, Any], fallback: str) -> str:
    """The command a document records, else the script's command marked as not recorded."""
    cmd = doc.get("command") or doc.get("cli")
    if cmd:
        return f"Command: `{command_text(cmd)}`."
    return f"Command not recorded in the JSON; its rows come from `{fallback}`."


def not_run(title: str, name: str) -> list[str]:
    return [f"## {title}", "", f"Not run yet: `benchmarks/results/{name}` is absent.", ""]


# --------------------------------------------------------------------------------- A: class-incremental replay
def _kind_key(kind: str, label: str) -> tuple[int, str]:
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), label)


def class_incremental(docs: dict[str, dict[str, Any]]) -> list[str]:
    """One table over every ``class_incremental*.json``: a column per (dataset, epochs), a row per strategy."""
    files = sorted(n for n in docs if n.startswith("class_incremental"))
    out = ["## A. Class-incremental replay at equal bytes (`benchmarks/class_incremental.py`)", "", TEXT["class_incremental"], ""]
    if not files:
        return out + ["Not run yet: no `benchmarks/results/class_incremental*.json`.", ""]
    runs = [r for n in files for r in docs[n].get("runs", [])]
    for name in files:
        doc, cfg = docs[name], docs[name].get("config", {})
        mine = docs[name].get("runs", [])
        datasets = sorted({r["dataset"] for r in mine}, key=_dataset_key)
        epochs = " ".join(map(str, sorted({r["epochs"] for r in mine})))
        seeds = " ".join(map(str, sorted({r["seed"] for r in mine})))
        out.append(f"- `{name}` ({epochs} epoch(s) per experience, ConvNet-3 width {cfg.get('width', '?')}, seeds {seeds}, "
                   f"{cfg.get('evaluated_on', 'test set')}). {recorded(doc)} " + command_line(
                       doc, f"python benchmarks/class_incremental.py --datasets {' '.join(datasets)} --epochs {epochs} --seeds {seeds} "
                            f"--resume --copy-json benchmarks/results/{name}` with `--baselines` / `--distilled SPEC"))
    columns = sorted({(r["dataset"], r["epochs"]) for r in runs}, key=lambda c: (c[1], _dataset_key(c[0])))
    seeds_of = {c: {r["seed"] for r in runs if (r["dataset"], r["epochs"]) == c} for c in columns}
    groups: dict[tuple[str, str], dict[tuple[str, int], list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[(r["kind"], r["label"])][(r["dataset"], r["epochs"])].append(r)
    out += ["", "Cells: final accuracy / average forgetting (points). *distill s*: seconds of distillation per run, mean over "
            "its runs.", "",
            "| strategy | bytes held | images held | distill s | " + " | ".join(f"{dataset_name(d)}, {e} ep" for d, e in columns) + " |",
            "|---|---:|---:|---:|" + "---:|" * len(columns)]
    for key in sorted(groups, key=lambda k: _kind_key(*k)):
        rows = [r for rs in groups[key].values() for r in rs]
        cells = []
        for c in columns:
            rs = groups[key].get(c)
            if not rs:
                cells.append("-")
                continue
            forget = [r["forgetting"] for r in rs if r.get("forgetting") is not None]
            n = f" (n={len(rs)})" if len(rs) != len(seeds_of[c]) else ""
            cells.append(pct(*mean_std(r["final_accuracy"] for r in rs)) + (f" / {100 * mean_std(forget)[0]:.1f}" if forget else "") + n)
        distill = [math.fsum(r["distill_seconds"]) for r in rows if r.get("distill_seconds")]
        out.append(f"| {key[1]} | {span(r['memory_bytes'] for r in rows)} | {span(r['memory_images'] for r in rows)} | "
                   f"{f'{mean_std(distill)[0]:,.0f}' if distill else '-'} | " + " | ".join(cells) + " |")
    out.append("")
    headline = max((docs[n].get("config", {}).get("headline_bytes") or 0) for n in files)
    if headline:
        out += _headline_lead(runs, columns, headline)
    return out


def _dataset_key(name: str) -> tuple[int, str]:
    return (list(DATASET_NAMES).index(name) if name in DATASET_NAMES else len(DATASET_NAMES), name)


def _headline_lead(runs: list[dict], columns: list[tuple[str, int]], headline: int) -> list[str]:
    """Per column: best distilled row minus the best row holding real images (a distilled-buffer row whose method
    selects real images counts as real), each run within the headline bytes; joint training excluded."""
    lines = []
    learned = {(r["kind"], r["label"]) for r in runs if r["kind"] == "distilled" and r.get("method") not in SELECTIONS}
    for d, e in columns:
        by_label: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for r in runs:
            if (r["dataset"], r["epochs"]) == (d, e) and r["kind"] != "joint":
                by_label[(r["kind"], r["label"])].append(r)
        fits = {k: mean_std(r["final_accuracy"] for r in rs)[0] for k, rs in by_label.items()
                if max(r["memory_bytes"] for r in rs) <= headline}
        ours = {k: m for k, m in fits.items() if k in learned}
        other = {k: m for k, m in fits.items() if k not in learned}
        if ours and other:
            best, rival = max(ours, key=ours.get), max(other, key=other.get)
            lines.append(f"- {dataset_name(d)}, {e} ep, within {headline:,} B: best distilled row `{best[1]}` {pct(ours[best])} vs best "
                         f"row holding real images `{rival[1]}` {pct(other[rival])}: {100 * (ours[best] - other[rival]):+.2f} points.")
    return lines + ([""] if lines else [])


# ----------------------------------------------------------------------------------------- A: the bytes sweep
#: Method options that make a distilled row a variant wherever they appear, even alone at its budget (so one
#: table row holds one kind of distillation across budgets).
VARIANT_OPTIONS = ("fill", "learner_aware", "real_batch")


def _family(row: dict[str, Any]) -> str:
    """Real selections are one family whatever pipeline they ran through (:func:`_split_pipelines` names the ones
    that are not the twins); other rows by the table row their run named."""
    return row["images"] if row["images"] in SELECTIONS else row.get("row", row["images"])


def _family_key(family: str) -> tuple[int, str]:
    head = family.split(":")[0].split(" ")[0]
    return (FAMILY_ORDER.index(head) if head in FAMILY_ORDER else len(FAMILY_ORDER), family)


def _method_options(row: dict[str, Any]) -> set[str]:
    """The ``key=value`` parts of a distilled row's spec that its pipeline (shared with the twins) does not hold."""
    shared = set(str(row.get("pipeline", "")).split(":"))
    return {part for part in row["spec"].split(":") if "=" in part and part not in shared}


def row_families(rows: list[dict[str, Any]]) -> list[str]:
    """Each row's family (the table row it belongs to), in the order of ``rows``.

    Distilled rows of one family with different method options at one (dataset, epochs, budget) are told apart by
    the options that differ (``distilled:dm, learner_aware=1, real_batch=256``), not pooled into one mean; the
    :data:`VARIANT_OPTIONS` are named wherever they appear."""
    families = [_family(r) for r in rows]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (r, f) in enumerate(zip(rows, families)):
        if is_distilled(f):
            groups[(r["dataset"], r["epochs"], r["budget_bytes"], r.get("evaluated_on", "test set"), f)].append(i)
    for members in groups.values():
        options = {rows[i]["spec"]: _method_options(rows[i]) for i in members}
        common = set.intersection(*options.values())  # all of a spec's own options when it is alone
        for i in members:
            own = options[rows[i]["spec"]]
            shown = (own - common) | {o for o in own if o.split("=")[0] in VARIANT_OPTIONS}
            if shown:
                families[i] = ", ".join([families[i], *sorted(shown, key=lambda o: o.split("=")[0])])
    _split_pipelines(rows, families)
    return families


def _split_pipelines(rows: list[dict[str, Any]], families: list[str]) -> None:
    """Rows of one family at one (dataset, epochs, budget, split) that went through different pipelines are different
    table rows, never one mean: those through the pipeline of the cell's best distilled or hybrid row keep the family's
    name (so the twins of the row the lead is about stay "twin"), the others get `` (<pipeline>)`` appended."""
    cells: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        cells[(r["dataset"], r["epochs"], r["budget_bytes"], r.get("evaluated_on", "test set"))].append(i)
    for members in cells.values():
        pipelines: dict[str, set] = defaultdict(set)
        for i in members:
            pipelines[families[i]].add(rows[i].get("pipeline"))
        runs: dict[tuple, list[float]] = defaultdict(list)  # (distilled family, pipeline) -> accuracies
        for i in members:
            if is_distilled(families[i]):
                runs[(families[i], rows[i].get("pipeline"))].append(rows[i]["final_accuracy"])
        kept = max(runs, key=lambda k: mean_std(runs[k])[0], default=(None, None))[1]
        # a family through several pipelines, and real selections that are not the best distilled row's twins
        mixed = {f for f, seen in pipelines.items() if len(seen) > 1 or (f in SELECTIONS and kept is not None and seen != {kept})}
        if not mixed:
            continue
        for i in members:
            if families[i] in mixed and rows[i].get("pipeline") != kept:
                families[i] = f"{families[i]} ({rows[i].get('pipeline')})"


def is_distilled(family: str) -> bool:
    """Whether a table row holds distilled images (all of them, or a hybrid's share)."""
    return family.startswith(("distilled:", "hybrid:"))


def sweep_summary(rows: list[dict[str, Any]], split: str | None = "test set") -> dict[tuple[str, int, int], dict[str, list[dict]]]:
    """(dataset, epochs, budget) -> family (:func:`row_families`) -> its rows (one per seed); only rows scored on
    ``split`` (all rows when ``None``: a single run of ``bytes_sweep.py`` scores on one split)."""
    out: dict[tuple[str, int, int], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    kept = [r for r in rows if split is None or r.get("evaluated_on", "test set") == split]
    for r, family in zip(kept, row_families(kept)):
        out[(r["dataset"], r["epochs"], r["budget_bytes"])][family].append(r)
    return out


def best_lead(means: dict[str, float]) -> float | None:
    """Best distilled or hybrid mean minus the best mean of a row holding real images (``None`` if either is missing)."""
    ours = [m for f, m in means.items() if is_distilled(f)]
    real = [m for f, m in means.items() if f.split(" ")[0] in REAL_FAMILIES]
    return max(ours) - max(real) if ours and real else None


def sweep_lead(families: dict[str, list[dict]]) -> float | None:
    """:func:`best_lead` of the families' mean accuracies."""
    return best_lead({f: mean_std(r["final_accuracy"] for r in rs)[0] for f, rs in families.items()})


def budget_text(dataset: str, budget: int) -> str:
    pixels = PIXELS.get(dataset)
    return f"{budget:,} B" + (f" ({budget / (10 * (pixels + 1)):.3g} img/class)" if pixels else "")


def family_text(family: str, rows: list[dict[str, Any]]) -> str:
    """A row's name: twins and distilled rows by family, the other rows by the pipeline their runs recorded."""
    head = family.split(":")[0]
    if head in SELECTIONS and family == head:
        return f"twin: {head} real images"
    if is_distilled(family):
        return family.replace(":", " (", 1) + ")"
    if " (" in family and family.endswith(")"):
        head, pipeline = family[:-1].split(" (", 1)
        return f"{head} real images through `{pipeline}`"
    pipes = sorted({str(r.get("pipeline")) for r in rows if r.get("pipeline")})
    return f"{family}: {' / '.join(pipes)}" if pipes else family


def bytes_sweep(docs: dict[str, dict[str, Any]]) -> list[str]:
    title = "A. Where distillation earns its bytes: the bytes sweep with twins (`benchmarks/bytes_sweep.py`)"
    doc = docs.get("bytes_sweep.json")
    if doc is None:
        return not_run(title, "bytes_sweep.json")
    rows = doc.get("rows", [])
    summ = sweep_summary(rows)
    cfg = doc.get("config", {})
    out = [f"## {title}", "", TEXT["bytes_sweep"], "",
           recorded(doc) + f" Rows scored on the test set; ConvNet-3 width {cfg.get('width', '?')}. "
           + command_line(doc, "python benchmarks/bytes_sweep.py --datasets D --images-per-class N --pipeline P --distilled SPEC "
                               "--resume --copy-json benchmarks/results/bytes_sweep.json"), ""]
    if doc.get("note"):
        out += [f"Note recorded with the rows: {doc['note']}", ""]
    held_out = sum(1 for r in rows if r.get("evaluated_on", "test set") != "test set")
    if held_out:
        out += [f"{held_out} rows scored on a validation split are in the JSON but not in these tables.", ""]
    out += ["The pipeline each distilled row shares with its twins, and the distilled row's spec, per budget:", ""]
    for b in sorted({k[2] for k in summ}):
        fams = [(f, rs) for k, fs in summ.items() if k[2] == b for f, rs in fs.items()]
        pipes = sorted({r["pipeline"] for f, rs in fams if f in SELECTIONS or is_distilled(f) for r in rs})
        specs = sorted({r["spec"] for f, rs in fams if is_distilled(f) for r in rs})
        out.append(f"- {b:,} B: `{'`, `'.join(pipes) or '-'}`; " + (", ".join(f"`{s}`" for s in specs) or "no distilled row"))
    out += ["", "Cells: final accuracy (images held, largest bytes held).", ""]
    # one table per dataset at 1 epoch per experience; one per epoch count above it, its datasets side by side
    tables: dict[tuple[int, str | None], list[tuple[str, int, int]]] = defaultdict(list)
    for d, e, b in summ:
        tables[(e, d if e == 1 else None)].append((d, e, b))
    for epochs, dataset in sorted(tables, key=lambda k: (k[0], _dataset_key(k[1]) if k[1] else ())):
        cells = sorted(tables[(epochs, dataset)], key=lambda c: (_dataset_key(c[0]), c[2]))
        families = sorted({f for c in cells for f in summ[c]}, key=_family_key)
        seeds = sorted({r["seed"] for c in cells for rs in summ[c].values() for r in rs})
        names = dataset_name(dataset) if dataset else " / ".join(dict.fromkeys(dataset_name(c[0]) for c in cells))
        out += [f"### {names}, {epochs} epoch(s) per experience, seeds {', '.join(map(str, seeds))}", "",
                "| images held | " + " | ".join(("" if dataset else f"{dataset_name(c[0])} ") + budget_text(c[0], c[2]) for c in cells) + " |",
                "|---|" + "---:|" * len(cells)]
        for f in families:
            texts = []
            for c in cells:
                rs = summ[c].get(f)
                if not rs:
                    texts.append("-")
                    continue
                n = f", n={len(rs)}" if len(rs) != len(seeds) else ""
                texts.append(f"{pct(*mean_std(r['final_accuracy'] for r in rs))} ({span(r['memory_images'] for r in rs)} img, "
                             f"≤{max(r['memory_bytes'] for r in rs):,} B{n})")
            name = family_text(f, [r for c in cells for r in summ[c].get(f, [])])
            out.append(f"| {'**' + name + '**' if is_distilled(f) else name} | " + " | ".join(texts) + " |")
        leads = [sweep_lead(summ[c]) for c in cells]
        out.append("| **lead** (points) | " + " | ".join("-" if x is None else f"**{100 * x:+.2f}**" for x in leads) + " |")
        distill = [[r["distill_seconds"] for f, rs in summ[c].items() if is_distilled(f) for r in rs] for c in cells]
        out += ["| distillation s per run (distilled rows) | " + " | ".join(f"{mean_std(v)[0]:,.0f}" if v else "-" for v in distill) + " |", ""]
    return out


def readme_table(docs: dict[str, dict[str, Any]]) -> list[str]:
    """README's headline: the best distilled or hybrid row beside the twins and raw replay at one and ten raw images'
    bytes per class (every distilled configuration is in RESULTS.md)."""
    doc = docs.get("bytes_sweep.json")
    if doc is None:
        return ["The bytes sweep has not been run yet (`benchmarks/results/bytes_sweep.json` is absent)."]
    summ = sweep_summary(doc.get("rows", []))
    keys = [k for k in sorted(summ) if PIXELS.get(k[0]) and round(k[2] / (10 * (PIXELS[k[0]] + 1)), 6) in README_IMAGES_PER_CLASS]
    columns = sorted({(d, e) for d, e, _ in keys}, key=lambda k: (k[1], list(DATASET_NAMES).index(k[0]) if k[0] in DATASET_NAMES else 99, k[0]))
    ipcs = sorted({round(b / (10 * (PIXELS[d] + 1)), 6) for d, _, b in keys})
    counts = [len(rs) for k in keys for rs in summ[k].values()]
    usual = max(set(counts), key=counts.count) if counts else 0
    width = (doc.get("config") or {}).get("width", "?")
    lines = [f"| final accuracy % (mean ± std, {usual} seeds unless marked; ConvNet-3 width {width}) | " + " | ".join(f"{dataset_name(d)} {e} ep" for d, e in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for ipc in ipcs:
        at = {c: next((summ[k] for k in keys if (k[0], k[1]) == c and round(k[2] / (10 * (PIXELS[k[0]] + 1)), 6) == ipc), {}) for c in columns}
        budgets = sorted({k[2] for k in keys if round(k[2] / (10 * (PIXELS[k[0]] + 1)), 6) == ipc})
        pipes = sorted({r["pipeline"] for fams in at.values() for f, rs in fams.items()
                        if f in SELECTIONS or is_distilled(f) for r in rs})
        lines.append(f"| *{' / '.join(f'{b:,}' for b in budgets)} bytes ({ipc:g} raw image(s) per class); distilled row and twins "
                     f"hold {' / '.join(f'`{p}`' for p in pipes)}* |" + " |" * len(columns))
        families = sorted({f for fams in at.values() for f in fams}, key=_family_key)
        best = {c: max((f for f in at[c] if is_distilled(f)), default=None,
                       key=lambda f, c=c: mean_std(r["final_accuracy"] for r in at[c][f])[0]) for c in columns}
        if any(best.values()):  # one row: each column's best distilled or hybrid configuration, named in its cell
            cells = ["-" if f is None else f"{pct(*mean_std(r['final_accuracy'] for r in at[c][f]))} ({f.replace(':', ': ', 1)})"
                     for c, f in best.items()]
            imgs = span(r["memory_images"] for c, f in best.items() if f for r in at[c][f])
            lines.append(f"| **best distilled or hybrid**, {imgs} images | " + " | ".join(cells) + " |")
        for f in families:
            if is_distilled(f):
                continue
            cells = []
            for c in columns:
                rs = at[c].get(f)
                cells.append("-" if not rs else pct(*mean_std(r["final_accuracy"] for r in rs)) + (f" (n={len(rs)})" if len(rs) != usual else ""))
            imgs = span(r["memory_images"] for fams in at.values() for r in fams.get(f, []))
            name = family_text(f, [r for fams in at.values() for r in fams.get(f, [])])
            lines.append(f"| {name}, {imgs} images | " + " | ".join(cells) + " |")
        leads = [sweep_lead(at[c]) if at[c] else None for c in columns]
        lines.append("| lead of distilled over the best real-image row (points) | "
                     + " | ".join("-" if x is None else f"{100 * x:+.2f}" for x in leads) + " |")
    return lines


# ------------------------------------------------------------------------------- B: distilled-set quality
def distill_quality(docs: dict[str, dict[str, Any]]) -> list[str]:
    title = "B. Distilled-set quality (`benchmarks/distill_quality.py`)"
    doc = docs.get("distill_quality.json")
    if doc is None:
        return not_run(title, "distill_quality.json")
    rows = sorted(doc.get("rows", []), key=lambda r: (r["dataset"] != "mnist", r["dataset"], r["ipc"], -r["mean"]))
    commands: list[str] = []
    for r in rows:
        if r.get("command") and command_text(r["command"]) not in commands:
            commands.append(command_text(r["command"]))
    loads = [r["load_average"][0] for r in rows if r.get("load_average")]
    cores = sorted({r["cores"] for r in rows if r.get("cores")})
    nets = sorted({r.get("eval_networks") for r in rows if r.get("eval_networks")})
    epochs = sorted({r.get("eval_epochs") for r in rows if r.get("eval_epochs")})
    dates = sorted(r["date"] for r in rows if r.get("date"))
    out = [f"## {title}", "", TEXT["distill_quality"], "",
           f"Recorded: {dates[0]} to {dates[-1]} (one date per row); {'/'.join(map(str, cores))}-core CPU, no GPU; 1-minute load "
           f"average {min(loads):.2f}-{max(loads):.2f}; {'/'.join(map(str, nets))} networks x {'/'.join(map(str, epochs))} epochs per row."
           if dates and loads else recorded(doc), "",
           "| dataset | IPC | method | stored img/class | ConvNet-3 | MLP drop | LeNet-5 drop | distill s | iterations | cmd |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        method = r["method"] + ("" if r.get("parameterisation") in (None, "full") else f" {r['parameterisation']}")
        cross = r.get("cross") or {}
        drops = [num(100 * cross[k]["drop"] if cross.get(k) else None, ".2f") for k in ("mlp", "lenet")]
        cmd = commands.index(command_text(r["command"])) + 1 if r.get("command") else "-"
        out.append(f"| {r['dataset']} | {r['ipc']} | {method} | {r.get('stored_images_per_class', '-')} | {pct(r['mean'], r['std'])} | "
                   f"{drops[0]} | {drops[1]} | {num(r.get('distill_seconds'), ',.0f')} | {num(r.get('iterations_done'), ',')} | {cmd} |")
    # One line: the page's line bar leaves no room for a line per command.
    out += ["", "Commands (`cmd` above): " + "; ".join(f"({i}) `{c}`" for i, c in enumerate(commands, 1)), ""]
    return out


# ------------------------------------------------------------------------------------ C: on-device retraining
def edge(docs: dict[str, dict[str, Any]]) -> list[str]:
    title = "C. On-device retraining (`benchmarks/edge_retrain.py`)"
    files = sorted(n for n in docs if n.startswith("edge_retrain"))
    if not files:
        return not_run(title, "edge_retrain.json")
    out = [f"## {title}", "", TEXT["edge"], ""]
    for name in files:
        doc = docs[name]
        args = doc.get("args", {})
        shown = {k: args[k] for k in ("seeds", "weights", "width", "threads", "buffer_method", "buffer_size", "memory_limit_mb") if k in args}
        out += [f"### `{name}`", "", recorded(doc) + " " + command_line(doc, "python benchmarks/edge_retrain.py") + " Recorded arguments: "
                + "; ".join(f"{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in shown.items()) + ".", ""]
        runs = (doc.get("summary") or {}).get("runs") or {}
        if runs:
            out += ["| weights | mode | bundle KB | ONNX step ms | PyTorch step ms | ratio | peak RSS MB | old acc with buffer | "
                    "without | new acc with buffer | one-step parity | PyTorch's own spread |",
                    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for weights, modes in runs.items():
                for mode, s in modes.items():
                    par = s.get("parity_lr0.01") or {}
                    out.append(f"| {weights} | {mode} | {stat(s.get('kb'), 1, 1)} | {stat(s.get('ort_ms'))} | {stat(s.get('torch_ms'))} | "
                               f"{stat(s.get('ratio'))} | {stat(s.get('rss'), 1, 1)} | {stat(s.get('old_with'), 100)} | "
                               f"{stat(s.get('old_without'), 100)} | {stat(s.get('new_with'), 100)} | {num(par.get('one_step'), '.1e')} | "
                               f"{num(par.get('one_step_torch_no_onednn'), '.1e')} |")
            out.append("")
        wide = (doc.get("summary") or {}).get("wide") or {}
        if wide:
            out += [f"Bundle size at width {args.get('wide_width', '?')} (width {args.get('width', '?')} in brackets) and the opened "
                    "model's old-class accuracy:", "",
                    "| weights | head KB | full KB | old acc opened on the device | drop vs PyTorch (points) |", "|---|---:|---:|---:|---:|"]
            for weights, s in wide.items():
                out.append(f"| {weights} | {stat(s.get('head_kb'), 1, 1)} ({stat(s.get('head_kb_narrow'), 1, 1)}) | "
                           f"{stat(s.get('full_kb'), 1, 1)} ({stat(s.get('full_kb_narrow'), 1, 1)}) | "
                           f"{stat(s.get('opened_old_acc'), 100)} | {stat(s.get('drop_points'))} |")
            out.append("")
        out += _buffer_rows(doc)
    return out


def _buffer_rows(doc: dict[str, Any]) -> list[str]:
    rows = doc.get("buffer_rows") or []
    if not rows:
        return []
    run = doc.get("buffer_rows_run") or {}
    out = ["The buffer the device replays, same bytes (" + recorded(run).removeprefix("Recorded: ").rstrip(".") + "):", "",
           "| buffer | seeds | images | buffer file bytes | bundle bytes | old-class acc | new-class acc | peak RSS MB (cap) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in sorted({r["buffer"] for r in rows}):
        mine = [r for r in rows if r["buffer"] == kind]
        out.append(f"| {kind} | {len(mine)} | {span(r.get('buffer_images', 0) for r in mine)} | "
                   f"≤{max(r['buffer_file_bytes'] for r in mine):,} | {num(max((r.get('bundle_bytes') or 0) for r in mine) or None, ',')} | "
                   f"{pct(*mean_std(r['old_class_accuracy'] for r in mine))} | {pct(*mean_std(r['new_class_accuracy'] for r in mine))} | "
                   f"{max(r['peak_rss_mb'] for r in mine):.1f} ({min(r['cap_mb'] for r in mine):g}) |")
    return out + [""]


# ------------------------------------------------------------------------------------------------- faults
def faults(docs: dict[str, dict[str, Any]]) -> list[str]:
    title = "Reliability under faults (`benchmarks/faults.py`)"
    doc = docs.get("faults.json")
    if doc is None:
        return not_run(title, "faults.json")
    args = doc.get("args", {})
    out = [f"## {title}", "", TEXT["faults"], "", recorded(doc) + " " + command_line(doc, "python benchmarks/faults.py")
           + " Recorded arguments: " + "; ".join(f"{k} {args[k]}" for k in ("cases", "trials", "rounds", "width", "memory_limit_mb",
                                                                             "seed", "quick") if k in args) + ".", ""]
    if doc.get("fuzz"):
        out += ["| fuzzed file | cases | named error | loads the original | other | worst ms | worst peak MB |", "|---|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {r.get('target')} | {num(r.get('cases'), ',')} | {num(r.get('named_error'), ',')} | {num(r.get('identical'), ',')} | "
                f"{num(r.get('other'), ',')} | {num(None if r.get('worst_seconds') is None else 1000 * r['worst_seconds'], '.1f')} | "
                f"{num(r.get('worst_peak_mb'), '.2f')} |" for r in doc["fuzz"]] + [""]
    if doc.get("kill"):
        out += ["| writer killed | trials | killed mid-write | old | new | torn | temporaries left → after next write |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {r.get('target')} | {r.get('trials')} | {r.get('killed')} | {r.get('old')} | {r.get('new')} | {r.get('torn')} | "
                f"{r.get('temporaries_left_by_kills')} → {r.get('temporaries_after_next_write')} |" for r in doc["kill"]] + [""]
    rounds = doc.get("retrain_rounds") or {}
    if rounds:
        out += [f"Device rounds: {rounds.get('rounds')} open-fit-evaluate-save rounds under a {num(rounds.get('cap_mb'), 'g')} MB cap: "
                f"peak resident {num(rounds.get('peak_rss_mb'), '.1f')} MB, drift from round 2 to the last "
                f"{num(rounds.get('drift_mb_round2_to_last'), '+.1f')} MB.", ""]
    hostile_doc = doc.get("hostile_inputs") or {}
    hostile = hostile_doc.get("cases") or []
    if hostile:
        errors: dict[str, int] = defaultdict(int)
        for r in hostile:
            errors[str(r.get("error")).split(":")[0]] += 1
        same = sum(bool(r.get("state_unchanged")) for r in hostile), sum(bool(r.get("bundle_unchanged")) for r in hostile)
        peak = max((r.get("peak_rss_mb") or 0.0) for r in hostile)
        out += [f"Hostile device inputs ({len(hostile)}: {', '.join(str(r.get('input')) for r in hostile)}): errors raised "
                f"{', '.join(f'{k} x{v}' for k, v in sorted(errors.items()))}; parameters unchanged after {same[0]}, bundle unchanged "
                f"after {same[1]}; peak resident {peak:.1f} MB; torch loaded in the device process: "
                f"{hostile_doc.get('torch_loaded', rounds.get('torch_loaded', '-'))}.", ""]
    if doc.get("bugs_found"):
        out += [f"Defects these runs found, each fixed with a regression test: {len(doc['bugs_found'])} "
                "(listed with their fixes and tests in `BUGS_FOUND`, `benchmarks/faults.py`).", ""]
    return out


# --------------------------------------------------------------------------------------- distributed and GPU
def distributed(docs: dict[str, dict[str, Any]]) -> list[str]:
    title = "Distributed distillation (`benchmarks/distributed_speedup.py`)"
    doc = docs.get("distributed.json")
    if doc is None:
        return not_run(title, "distributed.json")
    out = [f"## {title}", "", TEXT["distributed"], "", recorded(doc) + " " + command_line(doc, "python benchmarks/distributed_speedup.py")
           + (f" Each run: `{command_text(doc['cli'])}` with the flags below." if doc.get("cli") else ""), "", "| workers | runs | mean wall s | best wall s | speedup over 1 worker (mean) | same tensors |", "|---|---:|---:|---:|---:|---|"]
    runs = doc.get("runs", [])
    for config in sorted(doc.get("mean_wall_seconds", {})):
        n = sum(1 for r in runs if r.get("config") == config)
        speed = next((v for k, v in (doc.get("speedup") or {}).items() if k.startswith(config + " ")), None)
        out.append(f"| {config} ({next((r.get('flags') for r in runs if r.get('config') == config), '')}) | {n} | "
                   f"{doc['mean_wall_seconds'][config]:,.1f} | {num((doc.get('best_wall_seconds') or {}).get(config), ',.1f')} | "
                   f"{num(speed, '.2f')} | {doc.get('identical_tensors', '-')} |")
    return out + [""]


def gpu(docs: dict[str, dict[str, Any]]) -> list[str]:
    title = "GPU check (`benchmarks/gpu_check.py`)"
    files = sorted(n for n in docs if n.startswith("gpu"))
    if not files:
        return not_run(title, "gpu_check.json")
    out = [f"## {title}", "", TEXT["gpu"], ""]
    for name in files:
        doc = docs[name]
        out += [f"`{name}`: " + recorded(doc) + f" torch {doc.get('torch', '?')}, CUDA {doc.get('cuda', '?')}"
                + (" (a CPU dry run: no bars apply)." if doc.get("quick") else "."), "",
                "| part | item | accuracy % (CPU row) | distill s | status |", "|---|---|---:|---:|---|"]
        for r in doc.get("rows", []):
            acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.2f} ({num(r.get('cpu_accuracy'), '.2f')})"
            out.append(f"| {r.get('part')} | {r.get('item')} | {acc} | {num(r.get('distill_seconds'), '.2f')} | {r.get('status', '-')} |")
        out.append("")
    return out


# ------------------------------------------------------------------------------------------------ the documents
SECTIONS: tuple[Callable[[dict[str, dict[str, Any]]], list[str]], ...] = (
    class_incremental, bytes_sweep, distill_quality, edge, faults, distributed, gpu)


def load(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Every ``*.json`` under ``results_dir`` by file name (checksums verified where a document has one)."""
    return {p.name: read_checked_json(p) for p in sorted(Path(results_dir).glob("*.json"))}


def render_results(results_dir: Path = RESULTS_DIR) -> str:
    docs = load(results_dir)
    lines = ["# Benchmark results", ""] + TEXT["intro"] + [""]
    for section in SECTIONS:
        lines += section(docs)
    plots = sorted(p.name for p in Path(results_dir).glob("*.png"))
    if plots:
        lines += ["## Plots", "", "Committed beside the JSON, drawn by the benchmark scripts: "
                  + ", ".join(f"[{name}](results/{name})" for name in plots) + "."]
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def render_readme(readme_text: str, results_dir: Path = RESULTS_DIR) -> str:
    """``readme_text`` with the block between the markers replaced by the current table."""
    begin, end = readme_text.find(README_BEGIN), readme_text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"README has no results block: the lines {README_BEGIN!r} and {README_END!r} are missing")
    table = "\n".join(readme_table(load(results_dir)))
    return readme_text[:begin] + README_BEGIN + "\n" + table + "\n" + readme_text[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when RESULTS.md or README is out of date")
    p.add_argument("--results", default=str(RESULTS_DIR), help="folder of the JSON documents")
    args = p.parse_args(argv)
    results = render_results(Path(args.results))
    readme = render_readme(README.read_text(), Path(args.results))
    n = results.count("\n")
    if n > MAX_LINES:
        print(f"RESULTS.md would have {n} lines, more than {MAX_LINES}: shorten the tables", file=sys.stderr)
        return 1
    stale = [path for path, text in ((RESULTS_MD, results), (README, readme)) if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.name} is out of date: run python benchmarks/make_results.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in ((RESULTS_MD, results), (README, readme)):
        if path in stale:
            atomic_write(path, lambda tmp, text=text: tmp.write_text(text))
    print(f"RESULTS.md: {n} lines; README.md: {readme.count(chr(10))} lines" + (f"; rewrote {', '.join(p.name for p in stale)}" if stale else "; both up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
