"""``replaykit export`` (torch side) and ``replaykit retrain`` (device side).

``python -m edge retrain ...`` runs the device command without importing the
rest of ReplayKit, so it works where torch is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _net_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, int(value)
    except ValueError:
        return key, value


def add_export_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write an ONNX edge bundle (model + replay buffer) for on-device retraining",
        description="Build a replaykit.networks model, load its weights from a safetensors file, and export it with a "
                    "replay buffer as an edge bundle (model.onnx, train_step.onnx, buffer.safetensors, replay.safetensors, manifest.json).",
    )
    p.add_argument("--weights", required=True, help="model state_dict as .safetensors (never a pickle)")
    p.add_argument("--network", required=True, help="network name: convnet, mlp or lenet")
    p.add_argument("--net-opt", action="append", default=[], type=_net_option, metavar="KEY=VALUE",
                   help="network option, e.g. width=32 depth=3 norm=instance hidden=128 (repeatable)")
    p.add_argument("--buffer", required=True, help="replay buffer file written by SyntheticBuffer.save")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--mode", choices=["head", "full"], default="head", help="train only the classifier (head) or all")
    p.add_argument("--storage", choices=["uint8", "float16", "float32", "jpeg"], default=None,
                   help="replay image storage (default: as the buffer file holds them: its JPEG codes, or uint8 grey levels)")
    p.add_argument("--weight-storage", choices=["float32", "float16", "int8"], default="float32",
                   help="parameter storage in the bundle (int8: per-output-channel, float32 scales); the device "
                        "dequantizes to float32 and trains in float32 (--weights is the model file)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX-vs-PyTorch check (not recommended)")
    p.set_defaults(func=_export)


def add_retrain_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain", help="retrain an edge bundle on new samples with onnxruntime (no torch)",
        description="Learn new samples (an .npz with arrays x [N,C,H,W] uint8 pixels or float32 normalised, and y) "
                    "mixed with the bundle's replay buffer, then save the new parameters into the bundle.",
    )
    p.add_argument("bundle", help="bundle folder written by replaykit export")
    p.add_argument("--data", required=True, help=".npz with arrays x and y: the device's new samples")
    p.add_argument("--eval", action="append", default=[], metavar="NAME=FILE.npz",
                   help="report accuracy on this .npz before and after (repeatable)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32, help="new samples per step (default 32)")
    p.add_argument("--replay-batch-size", type=int, default=None, help="buffer samples per step (default: batch size; 0: no replay)")
    p.add_argument("--lr", type=float, default=None, help="override the bundle's learning rate")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="at most this many samples per onnxruntime call (same step, less memory; default: planned "
                        "from --memory-limit-mb)")
    p.add_argument("--memory-limit-mb", type=float, default=None, help="refuse to run above this resident memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true", help="do not write the new parameters back")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_retrain, device_side=True)  # keeps its resident set small: no allocator tuning


def add_cli(sub: argparse._SubParsersAction) -> None:
    add_export_cli(sub)
    add_retrain_cli(sub)


def _export(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import load_file

    from replaykit.buffer import SyntheticBuffer
    from replaykit.networks import make_network

    from .exporter import export

    weights_path = Path(args.weights)
    if not weights_path.is_file():
        raise FileNotFoundError(f"no weights file at {weights_path}")
    if weights_path.suffix != ".safetensors":
        raise ValueError(f"{weights_path}: weights must be a .safetensors state_dict (pickled checkpoints are refused)")
    try:
        state = load_file(str(weights_path))
    except Exception as exc:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {exc}") from exc
    if "classifier.weight" not in state:
        raise ValueError(f"{weights_path} has no 'classifier.weight': not a replaykit.networks state_dict")
    buffer = SyntheticBuffer.load(args.buffer)
    num_classes = int(state["classifier.weight"].shape[0])
    model = make_network(args.network, buffer.image_shape, num_classes, **dict(args.net_opt))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights_path} does not match network {args.network!r} {dict(args.net_opt)}: {exc}") from exc
    torch.manual_seed(args.seed)
    out = export(model, buffer, args.out, mode=args.mode, storage=args.storage, weights=args.weight_storage, lr=args.lr,
                 momentum=args.momentum,
                 weight_decay=args.weight_decay, verify=not args.no_verify, seed=args.seed, overwrite=args.overwrite)
    manifest = json.loads((out / "manifest.json").read_text())
    total = sum(entry["size"] for entry in manifest["files"].values())
    print(f"wrote {out}: mode={args.mode}, {len(buffer)} replay images ({manifest['image_storage']}), {args.weight_storage} weights, "
          f"{total / 1024:.1f} KB")
    return 0


def _load_npz(path: str) -> tuple[Any, Any]:
    import numpy as np

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no data file at {file}")
    try:
        with np.load(file, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise ValueError(f"{file} must hold arrays 'x' and 'y', has {sorted(data.files)}")
            return data["x"], data["y"]
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {file} as .npz: {exc}") from exc


def _retrain(args: argparse.Namespace) -> int:
    from .memory import peak_rss_mb
    from .retrainer import Retrainer

    retrainer = Retrainer(args.bundle, memory_limit_mb=args.memory_limit_mb, seed=args.seed, progress=not args.quiet)
    x, y = _load_npz(args.data)
    evals = {}
    for item in args.eval:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        evals[name] = _load_npz(path)
    report: dict[str, Any] = {"bundle": str(args.bundle), "samples": int(len(x))}
    report["before"] = {name: retrainer.evaluate(ex, ey) for name, (ex, ey) in evals.items()}
    history = retrainer.fit(x, y, epochs=args.epochs, batch_size=args.batch_size,
                            replay_batch_size=args.replay_batch_size, lr=args.lr,
                            micro_batch_size=args.micro_batch_size)
    report["after"] = {name: retrainer.evaluate(ex, ey) for name, (ex, ey) in evals.items()}
    report.update(steps=history["steps"], batch_size=history["batch_size"], replay_batch_size=history["replay_batch_size"],
                  micro_batch_size=history["micro_batch_size"], final_loss=history["losses"][-1], peak_rss_mb=peak_rss_mb())
    if not args.no_save:
        retrainer.save()
    report["saved"] = not args.no_save
    for name in evals:
        print(f"{name}: accuracy {report['before'][name]:.4f} -> {report['after'][name]:.4f}")
    print(f"{report['steps']} steps of {report['batch_size']} new + {report['replay_batch_size']} replay samples "
          f"(micro-batches of {report['micro_batch_size']}), final loss {report['final_loss']:.4f}, peak RSS {report['peak_rss_mb']:.1f} MB"
          + ("" if args.no_save else f", saved to {args.bundle}"))
    if args.json:
        from replaykit.fileio import atomic_write_json

        atomic_write_json(args.json, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Device-only entry point: ``python -m edge retrain BUNDLE --data new.npz``."""
    from .bundle import BundleError
    from .memory import MemoryLimitError

    parser = argparse.ArgumentParser(prog="python -m edge", description="ReplayKit edge device commands (no torch).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_retrain_cli(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, BundleError, MemoryLimitError) as exc:
        print(f"edge {args.command}: error: {exc}", file=sys.stderr)
        return 2
