"""``benchmarks/distill_quality.py --quick`` runs every registered method end to end and writes its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from replaykit import distill

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "distill_quality.py"


def test_quick_run_writes_json_table_and_plots(tmp_path):
    out = tmp_path / "dq"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["quick"] is True and doc["config"]["departures"]
    runs = doc["runs"]
    assert sorted(r["method"] for r in runs) == distill.available()
    for r in runs:
        assert r["dataset"] == "digits" and r["ipc"] == 1 and r["distill_seconds"] >= 0
        ev = r["evaluation"]
        assert 0 <= ev["convnet"]["mean"] <= 1 and set(ev["drop"]) == {"mlp", "lenet"}
        assert ev["privacy"]["real_subset_median"] > 0
        assert (out / f"digits_ipc1_{r['method']}.safetensors").exists()
    selection = [r for r in runs if distill.REGISTRY[r["method"]].selects]
    assert all(r["evaluation"]["privacy"]["synthetic_median"] == 0 for r in selection)
    table = (out / "results.md").read_text()
    assert "| digits | 1 | dm |" in table and "Departures from PROTOCOL B" in table
    assert (out / "accuracy_digits.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "best_digits.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_dataset_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--datasets", "cifar10", "--data-root", str(tmp_path),
                           "--out", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "cifar10" in proc.stderr and "not available" in proc.stderr
