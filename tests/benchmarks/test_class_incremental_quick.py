"""``benchmarks/class_incremental.py --quick`` runs end to end in a subprocess and writes its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "class_incremental.py"


def test_quick_run_writes_json_table_and_plot(tmp_path, real_data_root):
    out = tmp_path / "ci"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--quiet", "--methods", "random"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in doc["runs"]]
    assert labels == [
        "naive", "joint", "replay M=100", "class-balanced M=100", "herding M=100", "gdumb M=100", "der M=100",
        "distilled-random M=100",
    ]
    for r in doc["runs"]:
        assert r["dataset"] == "mnist" and r["seed"] == 0 and r["class_order"] == list(range(10))
        assert len(r["accuracy_matrix"]) == (1 if r["kind"] == "joint" else 5)
        assert 0 <= r["final_accuracy"] <= 1 and r["memory_images"] <= 100
    distilled = doc["runs"][-1]
    assert len(distilled["distill_seconds"]) == 5 and distilled["memory_images"] == 100
    assert doc["config"]["width"] == 16 and doc["config"]["quick"] is True
    table = (out / "results.md").read_text()
    assert "| mnist | distilled-random M=100 | 1 |" in table and "narrower for the 2-core CPU budget" in table
    assert (out / "accuracy_mnist.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_dataset_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--datasets", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "dataset 'cifar10' is not available" in proc.stderr and "CIFAR-10 is not under the data root" in proc.stderr
    assert not (tmp_path / "o" / "results.json").exists()
