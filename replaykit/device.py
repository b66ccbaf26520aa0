"""One way to name the device a computation runs on, for every entry point.

Why: distillers, evaluation, the continual runs and the CLIs all take ``device=``; parsing it
in one place gives the same meaning (``"auto"`` = CUDA when present) and the same error for a
bad name everywhere. Data that the user counts (buffers) stays on the host; only the work moves.
"""

from __future__ import annotations

import argparse

import torch

__all__ = ["resolve_device", "add_device_argument", "module_device"]

def resolve_device(device: str | torch.device | None = "cpu") -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` (CUDA when present, else CPU) or a ``torch.device``.

    ``None`` means ``"cpu"``. Raises ``ValueError`` naming the problem for an unknown name, or a
    CUDA device this machine does not have (so a typo never silently falls back to the CPU).
    """
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str) and device.strip().lower() == "auto":
        # "cuda" without an index: the process's current CUDA device when the work runs (a torchrun rank's own
        # GPU); resolving it does not initialise CUDA, so a process may still fork workers afterwards
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N', 'auto' or a torch.device, got {device!r}")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"device {device!r} is not supported: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asks for CUDA, but this PyTorch ({torch.__version__}) sees no CUDA device; "
                         "use --device cpu (or auto)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); CPU for a module without either."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _checked(text: str) -> str:
    try:
        resolve_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_device_argument(parser: argparse.ArgumentParser, help_what: str = "the work") -> None:
    """``--device`` (default ``cpu``; ``auto`` = CUDA when present), checked when the command line is parsed."""
    parser.add_argument("--device", default="cpu", type=_checked,
                        help=f"where {help_what} runs: cpu (default), cuda, cuda:N, or auto (CUDA when present)")
