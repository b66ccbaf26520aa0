"""Pictures people look at: buffer image grids and accuracy curves, written as PNG."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Mapping, Sequence

from .fileio import atomic_write

__all__ = ["save_buffer_grid", "save_accuracy_plot", "save_bytes_plot", "add_cli"]


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: str | os.PathLike) -> Path:
    plt = _figure()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def save_buffer_grid(buffer, path: str | os.PathLike, max_per_class: int = 10, class_names: Sequence[str] | None = None) -> Path:
    """Draw up to ``max_per_class`` images of each class as one row per class."""
    plt = _figure()
    if len(buffer) == 0:
        raise ValueError("the buffer is empty; nothing to draw")
    pixels = buffer.pixels()
    classes = buffer.classes
    names = class_names or buffer.meta.get("class_names") or [str(c) for c in range(buffer.num_classes)]
    cols = min(max_per_class, max(buffer.counts().values()))
    fig, axes = plt.subplots(len(classes), cols, figsize=(0.9 * cols + 1.2, 0.9 * len(classes) + 0.4), squeeze=False)
    for row, cls in enumerate(classes):
        idx = buffer.indices_of(cls)[:cols]
        for col in range(cols):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if col < len(idx):
                img = pixels[idx[col]].permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None, vmin=0, vmax=1)
            if col == 0:
                ax.set_ylabel(str(names[cls]), rotation=0, ha="right", va="center", fontsize=9)
    method = buffer.meta.get("method", "?")
    fig.suptitle(f"{buffer.meta.get('dataset', '')} · {method} · {len(buffer)} images", fontsize=10)
    return _save_png(fig, path)


def save_accuracy_plot(
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str = "",
    xlabel: str = "experience",
    ylabel: str = "accuracy (%)",
    errors: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """One line per method: accuracy after each experience (with optional ± bands)."""
    plt = _figure()
    if not curves:
        raise ValueError("no curves to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, values in curves.items():
        xs = list(range(1, len(values) + 1))
        ax.plot(xs, list(values), marker="o", label=name)
        if errors and name in errors:
            lo = [v - e for v, e in zip(values, errors[name])]
            hi = [v + e for v, e in zip(values, errors[name])]
            ax.fill_between(xs, lo, hi, alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_png(fig, path)


def save_bytes_plot(
    points: Mapping[str, Sequence[tuple[float, float, float]]],
    path: str | os.PathLike,
    title: str = "",
    ylabel: str = "final accuracy, all classes (%)",
) -> Path:
    """Accuracy against memory: one line per method over its ``(bytes, mean, std)`` points, bytes on a log axis.

    The picture a user decides from: for the bytes a device can spare, which buffer gives the most accuracy.
    """
    plt = _figure()
    if not points:
        raise ValueError("no points to plot")
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    markers = "osD^v<>P*X"  # with the 10 default colours: 100 lines before two look alike
    for i, (name, values) in enumerate(points.items()):
        values = sorted(values)
        xs, ys, es = zip(*values)
        ax.errorbar(xs, ys, yerr=es, marker=markers[(i // 10) % len(markers)], capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("memory held after the last experience (bytes, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    return _save_png(fig, path)


def _show(args: argparse.Namespace) -> int:
    from .buffer import SyntheticBuffer

    buffer = SyntheticBuffer.load(args.buffer)
    print(buffer)
    for key in ("dataset", "method", "ipc", "seed", "created"):
        if key in buffer.meta:
            print(f"  {key}: {buffer.meta[key]}")
    print(f"  bytes: float32 {buffer.nbytes('float32')}, float16 {buffer.nbytes('float16')}, uint8 {buffer.nbytes('uint8')}")
    if args.png:
        print(f"wrote {save_buffer_grid(buffer, args.png, max_per_class=args.max_per_class)}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="describe a buffer file and draw it as an image grid", description="Describe a buffer file; --png draws its images, one row per class.")
    p.add_argument("buffer", help="a .safetensors buffer written by ReplayKit")
    p.add_argument("--png", help="write a labelled image grid to this PNG file")
    p.add_argument("--max-per-class", type=int, default=10, help="images drawn per class (default 10)")
    p.set_defaults(func=_show)
