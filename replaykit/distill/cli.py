"""``replaykit distill``: distill a dataset (or some of its classes) into a buffer file."""

from __future__ import annotations

__all__ = ["add_cli"]


def _parse_classes(text: str | None, num_classes: int) -> list[int] | None:
    if not text:
        return None
    try:
        classes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--classes must be comma-separated integers, got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"--classes must name classes in [0, {num_classes - 1}], got {text!r}")
    return classes


def _distill_command(args) -> int:
    import torch

    from ..data import dataset_info, load_tensors
    from . import REGISTRY, make

    info = dataset_info(args.dataset)
    classes = _parse_classes(args.classes, info.num_classes)
    options = {"ipc": args.ipc, "seed": args.seed, "progress": not args.quiet}
    if args.iterations is not None:
        options["iterations"] = args.iterations
    if args.time_budget is not None:
        options["time_budget"] = args.time_budget
    if args.method in REGISTRY:
        try:
            distiller = make(args.method, **options)
        except TypeError:
            extra = [f"--{k.replace('_', '-')}" for k in ("iterations", "time_budget") if k in options]
            raise ValueError(f"method {args.method!r} does not take {' / '.join(extra)}") from None
    else:
        distiller = make(args.method)  # raises the registry's "unknown method" error naming the available ones
    images, labels = load_tensors(info.name, train=True, root=args.data_root)
    if classes is not None:
        keep = torch.isin(labels, torch.tensor(classes))
        images, labels = images[keep], labels[keep]
    buffer = distiller.distill(images, labels, num_classes=info.num_classes, meta=info.meta())
    path = buffer.save(args.out, storage=args.storage)
    print(f"{buffer!r} -> {path} ({buffer.meta['distill_seconds']:.1f} s)")
    if args.png:
        from ..viz import save_buffer_grid

        save_buffer_grid(buffer, args.png)
        print(f"grid -> {args.png}")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("distill", help="distill a dataset's training images into a small synthetic buffer")
    p.add_argument("--dataset", required=True, help="mnist, fashion-mnist, cifar10 or digits")
    p.add_argument("--method", default="dm", help="a registered method (see 'replaykit.distill.available()')")
    p.add_argument("--ipc", type=int, default=10, help="images per class")
    p.add_argument("--classes", help="comma-separated class ids to distill (default: all)")
    p.add_argument("--iterations", type=int, help="iterations (learned methods)")
    p.add_argument("--time-budget", type=float, help="seconds (learned methods)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", help="data root (default: $REPLAYKIT_DATA or ../shared/data)")
    p.add_argument("--out", required=True, help="output buffer (.safetensors)")
    p.add_argument("--storage", default="float32", choices=("float32", "float16", "uint8"))
    p.add_argument("--png", help="also save a grid of the images")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_distill_command)
