"""``benchmarks/edge_retrain.py --quick`` runs PROTOCOL C end to end (export, parity, no-torch device process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "edge_retrain.py"


def test_quick_run_measures_parity_latency_memory_size_and_forgetting(tmp_path, real_data_root):
    out = tmp_path / "edge"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--width", "16", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    (result,) = doc["results"]
    assert result["buffer_images"] == 100 and sum(result["buffer_counts"].values()) == 100
    for mode in ("head", "full"):
        row = result["modes"][mode]
        assert row["parity_max_abs_diff"] < 1e-4, row["parity"][0]["per_param"]
        assert [run["lr"] for run in row["parity"]] == [0.01, 0.001]
        # float64 PyTorch is the arithmetic-exact reference: the graph tracks it about as well as PyTorch does.
        assert row["parity"][0]["ort_vs_float64"] < 10 * row["parity"][0]["torch_vs_float64"] + 1e-6
        assert row["torch_step_ms_median"] > 0 and row["ort_step_ms_median"] > 0
        device = row["device"]
        assert device["torch_loaded"] is False and 20 < device["peak_rss_mb"] <= doc["args"]["memory_limit_mb"]
        assert device["with_buffer"]["batch"] == [32, 32] and device["without_buffer"]["batch"] == [32, 0]
        # The buffer keeps old classes: replay beats no replay on them even in this tiny run.
        assert device["with_buffer"]["old_acc"] > device["without_buffer"]["old_acc"]
        assert set(row["bundle_bytes"]) >= {"model.onnx", "train_step.onnx", "buffer.safetensors", "manifest.json"}
    assert "| head |" in (out / "results.md").read_text()
    assert (out / "forgetting.png").read_bytes()[:4] == b"\x89PNG"
