import subprocess
import sys

import pytest
import torch

from replaykit.buffer import SyntheticBuffer
from replaykit.cli import SUBCOMMANDS, build_parser, main


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    names = list(parser._subparsers._group_actions[0].choices)
    assert "show" in names and len(names) >= len(SUBCOMMANDS)
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: replaykit " + name in capsys.readouterr().out


def test_show_describes_and_draws(tmp_path, capsys):
    buf = SyntheticBuffer(torch.randn(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]), 2, meta={"mean": [0.5], "std": [0.5], "method": "dm"})
    path = buf.save(tmp_path / "b.safetensors")
    assert main(["show", str(path), "--png", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "method: dm" in out and (tmp_path / "g.png").stat().st_size > 0


def test_user_errors_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    result = subprocess.run([sys.executable, "-m", "replaykit.cli", "show", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "replaykit show: error:" in result.stderr and "Traceback" not in result.stderr


def test_data_command_reports_found_and_missing(tmp_path, capsys):
    assert main(["data", "digits", "cifar10", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "ok: 1438 train / 359 test" in out
    assert "cifar10" in out and "missing" in out


def test_allocator_tuning_is_skipped_for_the_device_command(tmp_path, monkeypatch):
    import replaykit.runtime

    calls = []
    monkeypatch.setattr(replaykit.runtime, "keep_freed_memory", lambda: calls.append(True))
    assert main(["retrain", str(tmp_path / "no-bundle"), "--data", str(tmp_path / "x.npz")]) == 2  # fails: no bundle
    assert calls == []  # the device side keeps its resident set small
    assert main(["show", str(tmp_path / "missing.safetensors")]) == 2
    assert calls == [True]  # host commands keep freed memory for speed
