"""``replaykit export`` from a safetensors state_dict, and ``replaykit retrain`` / ``python -m edge retrain``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import edge
from replaykit.cli import main


def _npz(path: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    np.savez(path, x=x.numpy().astype(np.float32), y=y.numpy())
    return path


def test_export_then_retrain_from_the_command_line(tmp_path, trained_model, replay_buffer, digits_split, capsys):
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trained_model.state_dict().items()}, str(weights))
    buffer_file = replay_buffer.save(tmp_path / "buffer.safetensors")
    bundle = tmp_path / "bundle"
    code = main(["export", "--weights", str(weights), "--network", "convnet", "--net-opt", "width=16",
                 "--net-opt", "depth=2", "--buffer", str(buffer_file), "--out", str(bundle), "--lr", "0.05"])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    manifest = edge.read_manifest(bundle)
    assert manifest["mode"] == "head" and manifest["optimizer"]["lr"] == 0.05 and manifest["weight_storage"] == "float32"
    int8_bundle = tmp_path / "bundle_int8"
    assert main(["export", "--weights", str(weights), "--network", "convnet", "--net-opt", "width=16", "--net-opt", "depth=2",
                 "--buffer", str(buffer_file), "--out", str(int8_bundle), "--weight-storage", "int8",
                 "--no-verify"]) == 0
    assert "int8 weights" in capsys.readouterr().out
    assert edge.read_manifest(int8_bundle)["param_storage"]["classifier.weight"] == "int8"
    assert sum(e["size"] for e in edge.read_manifest(int8_bundle)["files"].values()) < \
        sum(e["size"] for e in manifest["files"].values())

    x_train, y_train, x_test, y_test = digits_split
    new = _npz(tmp_path / "new.npz", x_train[y_train >= 8], y_train[y_train >= 8])
    test = _npz(tmp_path / "test.npz", x_test, y_test)
    report_file = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(Path(edge.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "edge", "retrain", str(bundle), "--data", str(new), "--eval", f"all={test}",
                           "--epochs", "2", "--quiet", "--memory-limit-mb", "400", "--json", str(report_file)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(report_file.read_text())
    assert report["after"]["all"] > report["before"]["all"] and report["saved"]
    assert edge.read_manifest(bundle)["saves"] == 1

    # Errors are one clean line and exit code 2.
    assert main(["retrain", str(tmp_path / "nowhere"), "--data", str(new)]) == 2
    assert "no bundle folder" in capsys.readouterr().err
    bad = _npz(tmp_path / "bad.npz", x_train[:4], torch.full((4,), 12))
    assert main(["retrain", str(bundle), "--data", str(bad), "--quiet"]) == 2
    assert "outside this bundle's classes" in capsys.readouterr().err


def test_export_refuses_pickles_and_mismatched_weights(tmp_path, trained_model, replay_buffer, capsys):
    buffer_file = replay_buffer.save(tmp_path / "buffer.safetensors")
    pickle_file = tmp_path / "model.pt"
    pickle_file.write_bytes(b"\x80\x04not a safetensors file")
    args = ["--network", "convnet", "--buffer", str(buffer_file), "--out", str(tmp_path / "b")]
    assert main(["export", "--weights", str(pickle_file), *args]) == 2
    assert "pickled checkpoints are refused" in capsys.readouterr().err
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trained_model.state_dict().items()}, str(weights))
    assert main(["export", "--weights", str(weights), *args, "--net-opt", "width=32", "--net-opt", "depth=2"]) == 2
    assert "does not match network" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
