"""``replaykit.device``: one meaning of ``device=`` / ``--device`` everywhere, and a named error for a bad one."""

from __future__ import annotations

import argparse

import pytest
import torch

from replaykit.cli import main
from replaykit.device import add_device_argument, module_device, resolve_device


def test_cpu_and_none_and_torch_devices_resolve_to_the_cpu():
    for spec in ("cpu", None, torch.device("cpu")):
        assert resolve_device(spec) == torch.device("cpu")


def test_auto_picks_cuda_exactly_when_torch_sees_it():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "", 3, "mps", "meta"])
def test_unknown_or_unsupported_devices_are_named(bad):
    with pytest.raises(ValueError, match="device"):
        resolve_device(bad)


def test_cuda_is_refused_with_the_reason_where_there_is_none():
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match="sees no CUDA device"):
            resolve_device("cuda")


def test_module_device_reads_the_parameters():
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")


def test_device_flag_defaults_to_cpu_and_is_checked_when_parsed(capsys):
    parser = argparse.ArgumentParser()
    add_device_argument(parser)
    assert parser.parse_args([]).device == "cpu"
    assert parser.parse_args(["--device", "auto"]).device == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "gpu"])
    assert "unknown device 'gpu'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["distill", "--dataset", "digits", "--out", "x.safetensors"], ["evaluate", "x.safetensors"],
                                     ["demo"]])
def test_the_commands_take_device_and_refuse_a_bad_one(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--device", "gpu0"])
    assert exc.value.code == 2 and "unknown device 'gpu0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([command[0], "--help"])
    assert "--device" in capsys.readouterr().out


@pytest.mark.cuda
def test_cuda_resolves_to_a_device_tensors_can_use():
    device = resolve_device("cuda")
    assert torch.ones(2, device=device).sum().item() == 2.0 and resolve_device("auto").type == "cuda"
