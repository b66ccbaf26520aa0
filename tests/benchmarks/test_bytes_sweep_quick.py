"""``benchmarks/bytes_sweep.py --quick``: every row of a budget, twins sharing the distilled row's pipeline, resumable."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bytes_sweep.py"
_spec = importlib.util.spec_from_file_location("bytes_sweep", SCRIPT)
bytes_sweep = importlib.util.module_from_spec(_spec)
sys.path.insert(0, str(SCRIPT.parent))
_spec.loader.exec_module(bytes_sweep)


def test_budgets_are_raw_images_per_class():
    assert bytes_sweep.budget_bytes("mnist", 1) == 7_850 and bytes_sweep.budget_bytes("mnist", 10) == 78_500
    assert bytes_sweep.budget_bytes("mnist", 0.25) == 1_963 and bytes_sweep.budget_bytes("cifar10", 1) == 30_730


def test_twins_share_the_distilled_pipeline_and_baselines_fit_the_bytes():
    rows = bytes_sweep.sweep_rows("mnist", 7_850, ("dm:core=1:iterations=50", "dm:core=0.5"), "jpeg:quality=2:logits=1:mix=0.5", "prefix",
                                  real_pipelines=("uint8:bits=2",))
    by = {r.get("row", r["images"]): r for r in rows}
    assert set(by) == {"distilled:dm", "hybrid:dm", "random", "herding", "replay", "der", "jpeg", "random (uint8:bits=2)"}
    assert by["random (uint8:bits=2)"]["pipeline"] == "uint8:bits=2:recompress=prefix"
    pipelines = {by[f]["pipeline"] for f in ("distilled:dm", "hybrid:dm", "random", "herding")}
    assert pipelines == {"jpeg:logits=1:mix=0.5:quality=2:recompress=prefix"}
    assert by["replay"]["spec"] == "replay:10" and by["der"]["spec"] == "der:9"  # 9 x (784 + 1 + 40) <= 7,850
    assert by["random"]["spec"] == "distilled:7850B:random:jpeg:quality=2:logits=1:mix=0.5:recompress=prefix"
    # a real pipeline that is the twins' own adds no second random row (it would run the random twin twice)
    same = bytes_sweep.sweep_rows("mnist", 7_850, ("dm",), "jpeg:quality=2:logits=1:mix=0.5", "prefix",
                                  baselines=False, real_pipelines=("jpeg:logits=1:quality=2:mix=0.5",))
    assert [r["images"] for r in same] == ["distilled:dm", "random", "herding"]


def test_lead_is_best_distilled_minus_best_real_row():
    fams = {"distilled:dm": (95.0, 0, 3), "hybrid:dm": (96.0, 0, 3), "random": (94.5, 0, 3), "der": (95.5, 0, 3), "replay": (90.0, 0, 3),
            "random (jpeg:quality=2)": (95.2, 0, 3)}
    assert abs(bytes_sweep.lead(fams) - 0.5) < 1e-9
    assert bytes_sweep.lead({"random": (90.0, 0, 1)}) is None


def test_summary_groups_rows_as_the_results_page_does_on_either_split():
    """The run's own table and the results page share one grouping: distilled rows with different options stay
    apart, and a validation run (which the page leaves out) is summarised too."""
    def row(images, acc, seed, spec, split="validation split of train"):
        return {"dataset": "mnist", "epochs": 5, "budget_bytes": 7_850, "images": images, "seed": seed, "final_accuracy": acc,
                "pipeline": "jpeg:quality=2:recompress=prefix", "spec": spec, "evaluated_on": split}
    rows = [row("distilled:dm", 0.90, 0, "distilled:7850B:dm:jpeg:quality=2:recompress=prefix:iterations=100"),
            row("distilled:dm", 0.80, 0, "distilled:7850B:dm:jpeg:quality=2:recompress=prefix:iterations=300"),
            row("herding", 0.85, 0, "distilled:7850B:herding:jpeg:quality=2:recompress=prefix")]
    cell = bytes_sweep.summary(rows)[("mnist", 5, 7_850)]
    assert sorted(round(m, 6) for m, _, _ in cell.values()) == [80.0, 85.0, 90.0]  # not one pooled dm mean of 85
    assert abs(bytes_sweep.lead(cell) - 5.0) < 1e-9


def test_quick_run_writes_rows_table_and_plot_and_resumes(tmp_path, real_data_root):
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--quiet", "--copy-json", str(tmp_path / "copy.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert json.loads((tmp_path / "copy.json").read_text())["rows"] == doc["rows"]
    rows = doc["rows"]
    assert {r.get("row", r["images"]) for r in rows} == {"distilled:dm", "random", "herding", "replay", "der", "jpeg",
                                                        "random (jpeg:quality=2:logits=1:mix=0.5)"}
    for r in rows:
        for key in ("dataset", "seed", "epochs", "budget_bytes", "memory_bytes", "memory_images", "images", "pipeline",
                    "final_accuracy", "distill_seconds"):
            assert key in r
        assert r["budget_bytes"] == 7_850 and 0 < r["memory_bytes"] <= 7_850 and 0 <= r["final_accuracy"] <= 1
    twins = {r["pipeline"] for r in rows if r.get("row", r["images"]) in ("distilled:dm", "random", "herding")}
    assert len(twins) == 1
    assert (out / "lead_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"
    assert "distilled - best real" in (out / "results.md").read_text()
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["rows"] == rows  # nothing re-run
