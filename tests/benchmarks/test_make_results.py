"""``benchmarks/make_results.py``: RESULTS.md and README's results table are what the committed JSON says.

Fails when a benchmark JSON changed and nobody ran ``python benchmarks/make_results.py``, when RESULTS.md or README
grew past its bar, and when the generator stops handling what benchmarks add (new budgets, datasets, absent files).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "make_results.py"
_spec = importlib.util.spec_from_file_location("make_results", SCRIPT)
make_results = importlib.util.module_from_spec(_spec)
sys.path.insert(0, str(SCRIPT.parent))
_spec.loader.exec_module(make_results)

DOCS = (ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", ROOT / "benchmarks" / "PROTOCOL.md")


def test_results_md_is_generated_from_the_committed_json():
    expected = make_results.render_results(ROOT / "benchmarks" / "results")
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == expected, "run: python benchmarks/make_results.py"


def test_readme_results_table_is_generated_from_the_committed_json():
    text = (ROOT / "README.md").read_text()
    assert make_results.render_readme(text, ROOT / "benchmarks" / "results") == text, "run: python benchmarks/make_results.py"


def test_line_bars_and_the_lines_ci_greps():
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text().count("\n") <= 300
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") <= 250
    lines = readme.splitlines()
    assert 'pip install -e ".[dev]"' in lines and "python -m pytest -q" in lines


def test_readme_python_blocks_parse():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 4
    for block in blocks:
        ast.parse(block)


def test_documents_cite_no_tracker_and_no_path_outside_the_repository():
    for path in DOCS:
        text = path.read_text()
        for pattern in (r"(?i)\bissues?\s*#?\d", r"\.\./shared", r"(?<![\w.<>])/(work|tmp|home)/", r"(?<![\w&])#\d"):
            assert not re.search(pattern, text), f"{path.name} matches {pattern!r}"
        for target in re.findall(r"\]\(([^)#\s]+)\)", text):  # relative links resolve inside the repository
            if not target.startswith(("http://", "https://")):
                assert (path.parent / target).resolve().is_relative_to(ROOT) and (path.parent / target).exists(), target


def test_a_changed_figure_makes_the_committed_page_stale(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    assert make_results.render_results(results) == (ROOT / "benchmarks" / "RESULTS.md").read_text()
    doc = json.loads((results / "distill_quality.json").read_text())
    doc["rows"][0]["mean"] += 0.01
    (results / "distill_quality.json").write_text(json.dumps(doc))
    assert make_results.render_results(results) != (ROOT / "benchmarks" / "RESULTS.md").read_text()


def _sweep_row(dataset, budget, images, acc, seed, **extra):
    return {"dataset": dataset, "epochs": 1, "budget_bytes": budget, "images": images, "seed": seed, "final_accuracy": acc,
            "memory_bytes": budget - 10, "memory_images": 7, "pipeline": "uint8:recompress=prefix", "spec": f"{images}:{budget}B",
            "distill_seconds": 2.0, "forgetting": 0.1, "total_seconds": 5.0, **extra}


def test_new_budgets_and_datasets_become_columns_and_tables_with_their_lead(tmp_path):
    rows = []
    for seed in (0, 1):
        rows += [_sweep_row("cifar10", 30_730, "distilled:dm", 0.40 + 0.02 * seed, seed),
                 _sweep_row("cifar10", 30_730, "random", 0.30, seed),
                 _sweep_row("cifar10", 30_730, "replay", 0.35, seed),
                 _sweep_row("cifar10", 307_300, "hybrid:dm", 0.50, seed),
                 _sweep_row("cifar10", 307_300, "herding", 0.55, seed),
                 _sweep_row("mnist", 1_963, "random", 0.60, seed),
                 _sweep_row("cifar10", 30_730, "herding", 0.99, seed, evaluated_on="validation split of train")]
    (tmp_path / "bytes_sweep.json").write_text(json.dumps({"rows": rows, "machine": "test machine"}))
    text = make_results.render_results(tmp_path)
    table = text[text.index("### Split-CIFAR-10"):]
    header = next(line for line in table.splitlines() if line.startswith("| images held"))
    assert "30,730 B (1 img/class)" in header and "307,300 B (10 img/class)" in header
    lead = next(line for line in table.splitlines() if line.startswith("| **lead**"))
    assert lead.split("|")[2:4] == [" **+6.00** ", " **-5.00** "]  # 41 - 35 (ReplayPlugin), 50 - 55 (herding twin)
    assert "41.00 ± 1.00" in table and "### Split-MNIST" in text
    assert "machine: test machine" in text and "2 rows scored on a validation split are in the JSON but not in these tables" in text


def test_absent_json_files_each_say_not_run(tmp_path):
    text = make_results.render_results(tmp_path)
    for name in ("class_incremental", "bytes_sweep.json", "distill_quality.json", "edge_retrain.json", "faults.json",
                 "distributed.json", "gpu_check.json"):
        assert re.search(rf"Not run yet: .*{re.escape(name)}", text), name
    assert not re.search(r"\d+\.\d\d ± ", text)  # no figure without a file


def test_edge_buffer_rows_and_faults_are_tabled(tmp_path):
    buffer_rows = [{"buffer": kind, "seed": seed, "buffer_images": images, "buffer_file_bytes": 80_000 + seed,
                    "bundle_bytes": 200_000, "old_class_accuracy": acc, "new_class_accuracy": 0.9, "peak_rss_mb": 80.0 + seed,
                    "cap_mb": 100.0} for seed in (0, 1, 2) for kind, images, acc in (("host-headline", 1400, 0.93), ("uint8-100", 100, 0.91))]
    (tmp_path / "edge_retrain.json").write_text(json.dumps({"buffer_rows": buffer_rows, "buffer_rows_run": {"date": "D"}}))
    (tmp_path / "faults.json").write_text(json.dumps({
        "fuzz": [{"target": "buffer file", "cases": 10_000, "named_error": 9_990, "identical": 10, "other": 0,
                  "worst_seconds": 0.0123, "worst_peak_mb": 1.5}],
        "kill": [{"target": "SyntheticBuffer.save", "trials": 200, "killed": 150, "old": 120, "new": 80, "torn": 0,
                  "temporaries_left_by_kills": 150, "temporaries_after_next_write": 0}],
        "retrain_rounds": {"rounds": 20, "cap_mb": 100.0, "peak_rss_mb": 91.25, "drift_mb_round2_to_last": 0.5},
        "hostile_inputs": {"cases": [{"input": "NaN images", "error": "ValueError: x has NaN", "state_unchanged": True,
                                      "bundle_unchanged": True, "peak_rss_mb": 85.0}]},
        "args": {"cases": 10_000, "trials": 200}, "date": "2026-12-05 00:00 UTC"}))
    text = make_results.render_results(tmp_path)
    assert "| host-headline | 3 | 1,400 | ≤80,002 | 200,000 | 93.00 ± 0.00 | 90.00 ± 0.00 | 82.0 (100) |" in text
    assert "| uint8-100 | 3 | 100 | ≤80,002 |" in text
    assert "| buffer file | 10,000 | 9,990 | 10 | 0 | 12.3 | 1.50 |" in text
    assert "| SyntheticBuffer.save | 200 | 150 | 120 | 80 | 0 | 150 → 0 |" in text
    assert "peak resident 91.2 MB" in text and "Hostile device inputs (1: NaN images): errors raised ValueError x1" in text


def test_gpu_and_distributed_documents_are_tabled(tmp_path):
    (tmp_path / "gpu_check.json").write_text(json.dumps({
        "machine": "x86_64, 16 CPUs, GPU-X", "torch": "2.9", "cuda": "12.8", "quick": False, "seconds": 300,
        "rows": [{"part": "a", "item": "distilled-dm 78500B", "accuracy": 95.5, "cpu_accuracy": 95.62, "status": "ok"},
                 {"part": "b", "item": "dm, 2000 it", "distill_seconds": 9.87, "status": "ok"}]}))
    (tmp_path / "distributed.json").write_text(json.dumps({
        "command": "/a/b/.venv/bin/python benchmarks/distributed_speedup.py --repeats 2", "mean_wall_seconds": {"1w": 200.0, "2w": 110.0},
        "speedup": {"2w over 1w": 1.82}, "runs": [{"config": "1w", "flags": "--workers 1"}, {"config": "2w", "flags": "--workers 2"}],
        "identical_tensors": True}))
    text = make_results.render_results(tmp_path)
    assert "| a | distilled-dm 78500B | 95.50 (95.62) | - | ok |" in text and "| b | dm, 2000 it | - | 9.87 | ok |" in text
    assert "GPU-X" in text and "Command: `python benchmarks/distributed_speedup.py --repeats 2`" in text
    assert "| 2w (--workers 2) | 1 | 110.0 | - | 1.82 | True |" in text


@pytest.mark.parametrize("cmd, shown", [
    ("/x/y/.venv/bin/python benchmarks/a.py --out /x/y/runs/z", "python benchmarks/a.py --out runs/z"),
    ("python b.py --out /tmp/x/d.json --n 2", "python b.py --out <scratch>/d.json --n 2"),
    ("distill_quality.py --export /home/u/repo/benchmarks/results/d.json", "python benchmarks/distill_quality.py --export benchmarks/results/d.json"),
])
def test_recorded_commands_lose_the_machine_paths(cmd, shown):
    assert make_results.command_text(cmd) == shown


def test_distilled_rows_with_different_options_at_one_budget_are_separate_rows_not_one_mean(tmp_path):
    rows = []
    for seed in (0, 1):
        base = "distilled:30730B:dm:uint8:recompress=prefix:core=1:iterations=500"
        rows += [_sweep_row("cifar10", 30_730, "distilled:dm", 0.40, seed, spec=base),
                 _sweep_row("cifar10", 30_730, "distilled:dm", 0.46, seed, spec=base + ":learner_aware=1"),
                 _sweep_row("cifar10", 30_730, "herding", 0.42, seed)]
    (tmp_path / "bytes_sweep.json").write_text(json.dumps({"rows": rows}))
    table = make_results.render_results(tmp_path)
    assert "| **distilled (dm)** | 40.00 ± 0.00" in table
    assert "| **distilled (dm, learner_aware=1)** | 46.00 ± 0.00" in table  # not pooled into 43.00
    lead = next(line for line in table.splitlines() if line.startswith("| **lead**"))
    assert "**+4.00**" in lead  # the best distilled row (46) minus the herding twin (42)
    # Alone at its budget, a variant keeps its name, so one table row holds one kind of distillation across budgets.
    alone = "distilled:76825B:dm:uint8:recompress=prefix:core=1:iterations=900:learner_aware=1"
    rows += [_sweep_row("cifar10", 76_825, "distilled:dm", 0.5, seed, spec=alone) for seed in (0, 1)]
    (tmp_path / "bytes_sweep.json").write_text(json.dumps({"rows": rows}))
    table = make_results.render_results(tmp_path)
    assert "| **distilled (dm, learner_aware=1)** | 46.00 ± 0.00 (7 img, ≤30,720 B) | 50.00 ± 0.00" in table


def test_readme_shows_each_columns_best_distilled_configuration_in_one_row(tmp_path):
    """README keeps one distilled row: per column the configuration with the best mean, named in its cell."""
    rows = []
    for seed in (0, 1):
        base = "distilled:7850B:dm:uint8:recompress=prefix:core=1:iterations=500"
        rows += [_sweep_row("mnist", 7_850, "distilled:dm", 0.90, seed, spec=base),
                 _sweep_row("mnist", 7_850, "distilled:recode", 0.80, seed, spec=base.replace("dm", "recode")),
                 _sweep_row("fashion-mnist", 7_850, "distilled:dm", 0.60, seed, spec=base),
                 _sweep_row("fashion-mnist", 7_850, "hybrid:dm", 0.70, seed, spec=base.replace("core=1", "core=0.5")),
                 _sweep_row("mnist", 7_850, "random", 0.85, seed), _sweep_row("fashion-mnist", 7_850, "random", 0.65, seed)]
    (tmp_path / "bytes_sweep.json").write_text(json.dumps({"rows": rows}))
    table = "\n".join(make_results.readme_table({"bytes_sweep.json": json.loads((tmp_path / "bytes_sweep.json").read_text())}))
    best = [line for line in table.splitlines() if line.startswith("| **")]
    assert len(best) == 1 and "90.00 ± 0.00 (distilled: dm)" in best[0] and "70.00 ± 0.00 (hybrid: dm)" in best[0]
    assert "80.00" not in table and "60.00" not in table  # the other configurations are RESULTS.md's
    assert table.splitlines()[-1].split("|")[2:4] == [" +5.00 ", " +5.00 "]


def test_twins_of_different_pipelines_at_one_budget_are_separate_rows_not_one_mean(tmp_path):
    """Two distilled configurations with their own pipelines at one budget: the best one's twins stay "twin", the
    other pipeline's twins get their own row, and the lead compares against each, never their pooled mean."""
    jpeg, grey = "jpeg:quality=2:recompress=prefix", "uint8:bits=2:recompress=prefix"
    rows = []
    for seed in (0, 1):
        rows += [_sweep_row("mnist", 19_625, "distilled:dm", 0.80, seed, pipeline=grey, spec=f"distilled:19625B:dm:{grey}:core=1"),
                 _sweep_row("mnist", 19_625, "herding", 0.78, seed, pipeline=grey, spec=f"distilled:19625B:herding:{grey}"),
                 _sweep_row("mnist", 19_625, "hybrid:dm", 0.95, seed, pipeline=jpeg, spec=f"distilled:19625B:dm:{jpeg}:core=0.1"),
                 _sweep_row("mnist", 19_625, "herding", 0.94, seed, pipeline=jpeg, spec=f"distilled:19625B:herding:{jpeg}")]
    (tmp_path / "bytes_sweep.json").write_text(json.dumps({"rows": rows}))
    table = make_results.render_results(tmp_path)
    assert "| twin: herding real images | 94.00 ± 0.00" in table  # the twin of the best row (the hybrid's pipeline)
    assert f"| herding real images through `{grey}` | 78.00 ± 0.00" in table
    assert "86.00" not in table  # not pooled
    lead = next(line for line in table.splitlines() if line.startswith("| **lead**"))
    assert "**+1.00**" in lead


def test_distilled_rows_of_one_family_through_different_pipelines_are_not_one_mean(tmp_path):
    """The same method and options through two pipelines at one budget (a validation sweep over codecs) stay two
    rows: the better one keeps the family's name, the other is named with its pipeline."""
    two, one = "uint8:bits=2:factor=2:recompress=prefix", "uint8:bits=1:factor=2:recompress=prefix"
    rows = [_sweep_row("mnist", 7_850, "distilled:dm", acc, 0, pipeline=pipe, spec=f"distilled:7850B:dm:{pipe}:iterations=500")
            for acc, pipe in ((0.90, two), (0.70, one))]
    families = make_results.row_families(rows)
    assert families[0] != families[1] and families[1].endswith(f"({one})")
    (tmp_path / "bytes_sweep.json").write_text(json.dumps({"rows": rows}))
    table = make_results.render_results(tmp_path)
    assert "90.00 ± 0.00" in table and "70.00 ± 0.00" in table and "80.00" not in table


def test_the_twin_rows_are_those_through_the_best_distilled_rows_pipeline(tmp_path):
    """A cell whose best distilled row holds JPEG codes while its random / herding rows of another run went through half
    resolution: those are named with their pipeline, and the random row of a real pipeline equal to the best distilled
    row's (the same run, recorded as an extra real pipeline) is its twin."""
    jpeg, grey = "jpeg:quality=2:recompress=prefix", "uint8:bits=2:factor=2:recompress=prefix"
    rows = [_sweep_row("mnist", 7_850, "distilled:dm", 0.90, 0, pipeline=grey, spec=f"distilled:7850B:dm:{grey}"),
            _sweep_row("mnist", 7_850, "random", 0.89, 0, pipeline=grey, spec=f"distilled:7850B:random:{grey}"),
            _sweep_row("mnist", 7_850, "random", 0.95, 0, pipeline=jpeg, spec=f"distilled:7850B:random:{jpeg}", row="random (jpeg:quality=2)"),
            _sweep_row("mnist", 7_850, "hybrid:dm", 0.96, 0, pipeline=jpeg, spec=f"distilled:7850B:dm:{jpeg}:core=0.1"),
            _sweep_row("mnist", 7_850, "herding", 0.97, 0, pipeline=jpeg, spec=f"distilled:7850B:herding:{jpeg}")]
    families = make_results.row_families(rows)
    assert families[2] == "random" and families[4] == "herding"  # the hybrid's twins
    assert families[1] == f"random ({grey})"  # the half-resolution row is not its twin
    (tmp_path / "bytes_sweep.json").write_text(json.dumps({"rows": rows}))
    table = make_results.render_results(tmp_path)
    assert "| twin: random real images | 95.00 ± 0.00" in table and f"random real images through `{grey}`" in table


def test_cells_above_one_epoch_share_one_table_with_their_datasets_side_by_side(tmp_path):
    rows = []
    for dataset, acc in (("mnist", 0.96), ("fashion-mnist", 0.74)):
        for epochs in (1, 5):
            rows += [dict(_sweep_row(dataset, 7_850, "distilled:dm", acc, 0), epochs=epochs),
                     dict(_sweep_row(dataset, 7_850, "herding", acc - 0.01, 0), epochs=epochs)]
    (tmp_path / "bytes_sweep.json").write_text(json.dumps({"rows": rows}))
    table = make_results.render_results(tmp_path)
    assert table.count("epoch(s) per experience, seeds") == 3  # MNIST 1 ep, Fashion-MNIST 1 ep, both at 5 ep
    header = next(line for line in table.splitlines() if "Split-MNIST 7,850 B" in line)
    assert "Split-Fashion-MNIST 7,850 B" in header
