"""``replaykit demo`` end to end, shortened (fewer epochs) to stay cheap."""

from __future__ import annotations

import json

from replaykit.cli import main


def test_demo_prints_a_table_and_writes_the_pngs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "3", "--method", "random", "--quiet", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| strategy | final avg acc (%)" in printed
    for label in ("naive", "replay M=20", "distilled-random M=20"):
        assert f"| {label} |" in printed
    for name in ("accuracy.png", "buffer.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    summary = json.loads((out / "results.json").read_text())
    assert [r["kind"] for r in summary["results"]] == ["naive", "replay", "distilled"]
    assert all(len(r["stream_accuracy"]) == 5 for r in summary["results"])
    assert summary["results"][2]["memory_images"] == summary["results"][1]["memory_images"] == 20


def test_demo_rejects_a_budget_below_one_image_per_class(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--mem", "5", "--quiet"]) == 2
    assert "--mem must be at least 10" in capsys.readouterr().err
