"""``benchmarks/distill_quality.py --quick`` runs every registered method end to end and writes its outputs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
from replaykit import distill
from replaykit.buffer import SyntheticBuffer
from replaykit.data import load_tensors

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "distill_quality.py"


def test_quick_run_writes_json_table_and_plots(tmp_path):
    out = tmp_path / "dq"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["quick"] is True and doc["config"]["departures"]
    runs = doc["runs"]
    full = [r for r in runs if r["parameterisation"] == "full"]
    # every method that distils a dataset on its own (boundary works on a continual learner)
    assert sorted(r["method"] for r in full) == [m for m in distill.available() if m != "boundary"]
    for r in runs:
        assert r["dataset"] == "digits" and r["ipc"] == 1 and r["distill_seconds"] >= 0
        ev = r["evaluation"]
        assert 0 <= ev["convnet"]["mean"] <= 1 and set(ev["drop"]) == {"mlp", "lenet"}
        assert ev["privacy"]["real_subset_median"] > 0 and all(t > 0 for t in ev["seconds"]["convnet"])
        suffix = "" if r["parameterisation"] == "full" else "_" + r["parameterisation"]
        assert (out / f"digits_ipc1_{r['method']}{suffix}.safetensors").exists()
    # Low resolution at equal bytes: factor 2 holds 4 images of 4x4 per class where full holds one 8x8 image.
    low = [r for r in runs if r["parameterisation"] == "factor2"]
    assert low and all(r["stored_images_per_class"] == 4 and r["evaluation"]["config"]["decoder_factor"] == 2 for r in low)
    buffer = SyntheticBuffer.load(out / f"digits_ipc1_{low[0]['method']}_factor2.safetensors")
    assert buffer.images.shape == (40, 1, 4, 4) and buffer.decoded_shape == (1, 8, 8)
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


def test_a_method_that_needs_a_continual_learner_is_refused_by_name(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--methods", "boundary", "--out", str(tmp_path / "o"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "['boundary'] work on a continual learner" in proc.stderr


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--quiet", "--parameterisations", "full", *args],
                          capture_output=True, text=True, timeout=900)


def test_resumes_finished_cells_with_workers_and_refuses_other_settings(tmp_path):
    out = str(tmp_path / "dq")
    first = _run("--methods", "random", "dm", "--workers", "2", "--out", out)
    assert first.returncode == 0, first.stderr[-3000:]
    before = json.loads((tmp_path / "dq" / "results.json").read_text())["runs"]
    assert [r["method"] for r in before] == ["random", "dm"] and before[1]["workers"] == 2
    # dm's ten classes went to two worker processes; the images equal a one-process run's.
    x, y = load_tensors("digits", train=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers and the benchmark (--threads 1): same kernels, same bits
    try:
        alone = distill.make("dm", ipc=1, seed=0, progress=False, **before[1]["options"]).distill(x, y, meta={"dataset": "digits"})
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(SyntheticBuffer.load(tmp_path / "dq" / "digits_ipc1_dm.safetensors").images, alone.images)
    # Rerun with one more method: the finished cells are kept as they were, only herding is new.
    second = _run("--methods", "random", "dm", "herding", "--out", out)
    assert second.returncode == 0, second.stderr[-3000:]
    after = json.loads((tmp_path / "dq" / "results.json").read_text())["runs"]
    assert after[:2] == before and [r["method"] for r in after] == ["random", "dm", "herding"]
    # Other settings would mix incomparable numbers: refused, naming the setting, nothing overwritten.
    third = _run("--methods", "random", "--seed", "1", "--out", out)
    assert third.returncode == 2 and "seed" in third.stderr and "--restart" in third.stderr
    assert json.loads((tmp_path / "dq" / "results.json").read_text())["runs"] == after


def test_a_distillation_budget_is_no_evaluation_departure():
    """Rows distilled under ``--budget`` with the PROTOCOL B evaluation go to benchmarks/results/ (they once did
    not: the budget was counted among the evaluation departures); a smaller evaluation keeps them out."""
    spec = importlib.util.spec_from_file_location("distill_quality_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    evaluation, every = script.protocol_departures(script.parse_args(["--budget", "300"]))
    assert evaluation == [] and len(every) == 1 and "budget 300 s" in every[0]
    evaluation, every = script.protocol_departures(script.parse_args(["--budget", "300", "--epochs", "30"]))
    assert len(evaluation) == 1 and "30 epochs" in evaluation[0] and len(every) == 2


def test_plot_export_redraws_the_committed_json_and_leaves_it_alone(tmp_path):
    """``--plot-export`` draws one accuracy chart per dataset beside the JSON; where a cell ran at several budgets
    the chart takes the run with the most distillation time, not the most accurate one."""
    spec = importlib.util.spec_from_file_location("distill_quality_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    row = {"dataset": "mnist", "ipc": 10, "method": "dm", "parameterisation": "full", "std": 0.001}
    doc = {"protocol": "PROTOCOL B", "rows": [{**row, "distill_seconds": 300.0, "mean": 0.90},
                                             {**row, "distill_seconds": 60.0, "mean": 0.95},
                                             {**row, "dataset": "fashion-mnist", "distill_seconds": 1.0, "mean": 0.8}]}
    export = tmp_path / "distill_quality.json"
    export.write_text(json.dumps(doc))
    drawn: list[dict] = []
    original = script._bar_chart
    script._bar_chart = lambda runs, dataset, path: (drawn.extend(r for r in runs if r["dataset"] == dataset),
                                                     original(runs, dataset, path))
    assert script.main(["--plot-export", "--export", str(export)]) == 0
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == ["distill_quality_accuracy_fashion-mnist.png", "distill_quality_accuracy_mnist.png"]
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in written)
    (mnist,) = [r for r in drawn if r["dataset"] == "mnist"]
    assert mnist["evaluation"]["convnet"]["mean"] == 0.90  # the 300 s run, not the better-scoring 60 s one
    assert json.loads(export.read_text()) == doc
