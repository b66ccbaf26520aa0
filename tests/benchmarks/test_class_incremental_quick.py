"""``benchmarks/class_incremental.py --quick`` runs end to end in a subprocess and writes its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "class_incremental.py"


def test_quick_run_writes_json_table_and_plots_at_equal_bytes(tmp_path, real_data_root):
    out = tmp_path / "ci"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--quiet", "--copy-json", str(tmp_path / "copy.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert json.loads((tmp_path / "copy.json").read_text()) == doc
    labels = [r["label"] for r in doc["runs"]]
    assert labels[:6] == ["naive", "replay M=100", "gdumb M=100", "der M=100", "downsample x2 78500B", "jpeg q50 78500B"]
    assert labels[6].startswith("distilled-dm 78500B uint8")
    for r in doc["runs"]:
        assert r["dataset"] == "mnist" and r["seed"] == 0 and r["class_order"] == list(range(10)) and r["epochs"] == 2
        for key in ("label", "kind", "final_accuracy", "memory_bytes", "memory_images", "distill_seconds", "total_seconds", "width"):
            assert key in r
        assert len(r["accuracy_matrix"]) == 5 and 0 <= r["final_accuracy"] <= 1
        if r["kind"] != "naive":
            assert r["memory_bytes"] <= (78_500 if r["kind"] != "der" else 78_500 + 100 * 40)
    by_kind = {r["kind"]: r for r in doc["runs"]}
    assert by_kind["replay"]["memory_images"] == 100 and by_kind["replay"]["memory_bytes"] == 78_500
    assert by_kind["downsample"]["memory_images"] > 300  # four times the images in the same bytes
    assert len(by_kind["distilled"]["distill_seconds"]) == 5 and by_kind["distilled"]["memory_bytes"] <= 78_500
    assert doc["config"]["width"] == 16 and doc["config"]["quick"] is True
    table = (out / "results.md").read_text()
    assert "| mnist | 2 | replay M=100 | 1 |" in table and "narrower for the 2-core CPU budget" in table
    for png in ("accuracy_mnist_2ep.png", "accuracy_vs_bytes_mnist_2ep.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_missing_dataset_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--datasets", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "dataset 'cifar10' is not available" in proc.stderr and "CIFAR-10 is not under the data root" in proc.stderr
    assert not (tmp_path / "o" / "results.json").exists()
