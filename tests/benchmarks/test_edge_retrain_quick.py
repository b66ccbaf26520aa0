"""``benchmarks/edge_retrain.py --quick`` runs PROTOCOL C end to end (export, parity, no-torch device process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "edge_retrain.py"


def test_quick_run_measures_parity_latency_memory_size_and_forgetting(tmp_path, real_data_root):
    out = tmp_path / "edge"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--width", "16", "--weights", "float32", "int8",
                           "--wide-width", "24", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    (result,) = doc["results"]
    assert result["buffer_images"] == 100 and sum(result["buffer_counts"].values()) == 100
    for weights, mode in [(w, m) for w in ("float32", "int8") for m in ("head", "full")]:
        row = result["runs"][weights][mode]
        first = row["parity"][0]
        assert [run["lr"] for run in row["parity"]] == ([0.01, 0.001] if weights == "float32" else [0.01])
        # What the product promises, step by step from PyTorch's own state (no drift carried between steps):
        # on every step where neither float32 forward puts a ReLU input on the other side of zero than float64
        # does, the graph's parameters and the momentum it hands on are PyTorch's to float32 resolution.
        assert 0 <= first["tie_steps"] < first["steps"]
        assert first["one_step_tie_free"] <= 1e-6
        # The momentum moves the parameters by lr x momentum: the same 1e-6 in parameter units (a wrong state output,
        # e.g. the gradient without the momentum term, is off by about the state itself, orders of magnitude more).
        assert first["one_step_state_tie_free"] * first["lr"] <= 1e-6
        assert first["state_abs_max_tie_free"] * first["lr"] > 1e-5
        # At a tie step the step may jump by one unit's gradient, which each CPU's kernels decide; bounded only far
        # above that (PyTorch's own oneDNN-on-vs-off spread is of the same order), far below a wrong graph.
        assert first["one_step"] <= 1e-4 and 0 < first["one_step_torch_vs_float64"] <= 1e-4
        assert 0 <= first["one_step_ort_vs_float64"] <= 1e-4 and 0 <= first["one_step_torch_no_onednn"] <= 1e-4
        assert first["one_step_worst"]["param"] in first["per_param"]
        # Trajectories over many steps are reported, not bounded: after a tie they are a float race between CPUs'
        # kernels (the int8 row: 1.92e-05 from float64 on one CPU, PyTorch 4.77e-07).
        for key in ("ort_vs_torch", "ort_vs_float64", "torch_vs_float64", "ort_vs_torch_no_onednn"):
            assert np.isfinite(first[key]) and first[key] >= 0, key
        assert row["parity_max_abs_diff"] == first["ort_vs_torch"]
        # At the worst step, the ReLU inputs whose sign onnxruntime's float32 forward gets wrong against float64
        # (the smallest |float64 value| among them).
        flips, smallest = first["one_step_worst"]["relu_sign_flips"], first["one_step_worst"]["relu_flip_min_abs_float64"]
        assert isinstance(flips, int) and flips >= 0 and (smallest is None) == (flips == 0)
        assert smallest is None or 0 <= smallest < 1e-3
        torch_flips = first["one_step_worst"]["torch_relu_sign_flips"]
        assert isinstance(torch_flips, int) and torch_flips >= 0
        assert row["torch_step_ms_median"] > 0 and row["ort_step_ms_median"] > 0
        device = row["device"]
        assert device["torch_loaded"] is False and 20 < device["peak_rss_mb"] <= doc["args"]["memory_limit_mb"]
        assert device["with_buffer"]["batch"] == [32, 32] and device["without_buffer"]["batch"] == [32, 0]
        # The buffer keeps old classes: replay beats no replay on them even in this tiny run.
        assert device["with_buffer"]["old_acc"] > device["without_buffer"]["old_acc"]
        assert set(row["bundle_bytes"]) >= {"model.onnx", "train_step.onnx", "buffer.safetensors", "manifest.json"}
        assert 0.5 < device["opened_old_acc"] <= 1.0
    for mode in ("head", "full"):  # int8 weights: a smaller bundle that opens to (nearly) the same model
        small, exact = result["runs"]["int8"][mode], result["runs"]["float32"][mode]
        assert small["bundle_bytes"]["buffer.safetensors"] < exact["bundle_bytes"]["buffer.safetensors"]
        assert abs(small["device"]["opened_old_acc"] - exact["device"]["opened_old_acc"]) <= 0.05
    fed = result["runs"]["float32"]["head"]["frozen_weights"]
    assert fed["step_ms_constants"] > 0 and fed["step_ms_fed"] > 0
    wide = result["wide"]
    assert wide["width"] == 24 and set(wide["storages"]) == {"float32", "int8"}
    assert wide["storages"]["int8"]["full_bytes"] < wide["storages"]["float32"]["full_bytes"]
    assert "drop vs float32" in (out / "results.md").read_text()
    assert "PyTorch one step vs float64" in (out / "results.md").read_text()
    assert "PyTorch one-step spread (oneDNN on vs off)" in (out / "results.md").read_text()
    assert "smallest abs float64 pre-activation among them" in (out / "results.md").read_text()
    assert isinstance(doc["torch_process_keeps_freed_memory"], bool)
    assert "| int8 | head |" in (out / "results.md").read_text()
    assert (out / "forgetting.png").read_bytes()[:4] == b"\x89PNG"


def test_quick_buffer_comparison_ships_the_hosts_buffer_in_its_bytes(tmp_path, real_data_root):
    """``--only-buffers``: the host's headline buffer (JPEG q2 codes + held logits) and 100 uint8 images, each at
    78,500 B, exported full mode / int8 and retrained on the device with torch blocked under the memory cap."""
    out = tmp_path / "edge"
    merged = tmp_path / "merged.json"
    merged.write_text(json.dumps({"kept": 1, "buffer_rows": [{"buffer": "uint8-100", "seed": 0, "stale": True}]}))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--only-buffers", "--width", "16", "--out", str(out),
                           "--copy-json", str(merged)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    rows = {row["buffer"]: row for row in doc["buffer_rows"]}
    assert set(rows) == {"host-headline", "uint8-100"}
    host, raw = rows["host-headline"], rows["uint8-100"]
    assert host["image_storage"] == "jpeg" and host["held_logits"] and host["mix"] == 0.5 and host["logit_loss_weight"] == 0.1
    assert raw["image_storage"] == "uint8" and not raw["held_logits"] and raw["buffer_images"] == 100
    assert raw["host_buffer_bytes"] == 78_500 and host["host_buffer_bytes"] <= 78_500
    assert host["buffer_images"] > 300  # JPEG q2 holds several times the images of raw uint8 in the same bytes
    for row in (host, raw):
        assert row["host_buffer_bytes"] < row["buffer_file_bytes"] <= row["host_buffer_bytes"] + 4096
        assert row["torch_loaded"] is False and 20 < row["peak_rss_mb"] <= row["cap_mb"] == 100
        assert 0 < row["old_class_accuracy"] <= 1 and 0 <= row["new_class_accuracy"] <= 1  # quick: 4 steps only
    document = json.loads(merged.read_text())
    assert document["kept"] == 1 and sorted(r["buffer"] for r in document["buffer_rows"]) == ["host-headline", "uint8-100"]
    assert "Replay buffers at the headline bytes" in (out / "results.md").read_text()
