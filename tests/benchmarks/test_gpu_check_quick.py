"""``benchmarks/gpu_check.py --device cpu --quick``: the GPU check's code path as a CPU dry run, and its guards."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_user_path_is_every_distilled_and_compressed_default_spec_with_a_cpu_row():
    check = _module()
    specs = check.user_specs(all_specs=False)
    ci = check._class_incremental()
    assert specs[: len(ci.DISTILLED)] == list(ci.DISTILLED)
    assert {s.split(":")[0] for s in specs} == {"distilled", "jpeg", "downsample"}
    assert set(check.user_specs(all_specs=True)) == set(ci.BASELINES) | set(ci.DISTILLED)
    rows, width = check.cpu_rows()
    from replaykit.continual import parse_spec

    missing = [s for s in specs if ("mnist", 0, 1, parse_spec(s).label) not in rows]
    assert not missing and width >= 1  # every spec has a committed seed-0 CPU row to be compared with


def test_dry_run_exercises_every_part_and_writes_the_json(tmp_path, real_data_root):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["quick"] is True and doc["device"] == "cpu" and doc["gpu"] is None and doc["failed"] == []
    parts = {r["part"] for r in doc["rows"]}
    assert parts == {"a", "b", "c", "d"}
    user = [r for r in doc["rows"] if r["part"] == "a"]
    assert len(user) == 2 and all(r["cpu_accuracy"] is not None and 0 <= r["accuracy"] <= 100 for r in user)
    speed = [r for r in doc["rows"] if r["part"] == "b"]
    assert len(speed) == 2 and all(r["distill_seconds"] > 0 and r["iterations_done"] == 3 for r in speed)
    assert "--device cpu" in speed[0]["command"]
    from replaykit import distill

    assert {r["item"].split()[0] for r in doc["rows"] if r["part"] == "c"} == set(distill.available()) - {"dm"}
    (tests,) = [r for r in doc["rows"] if r["part"] == "d"]
    assert tests["tests"] >= 1 and tests["failures"] == tests["errors"] == 0
    assert "| part | item |" in proc.stdout


def test_a_full_run_without_cuda_is_refused_with_the_way_to_a_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():  # on a GPU machine the refusal is of a device it does not have
        args, expected = ["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA device"
    else:
        args, expected = [], "--device cpu --quick"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and expected in proc.stderr and not (tmp_path / "x.json").exists()
