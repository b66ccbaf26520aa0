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


def _distill_per_class(args, options: dict, classes: list[int], info):
    """Each class as one job over ``--workers`` local processes or torchrun's ranks; ``None`` on ranks other than 0.

    The jobs name the dataset and a class: whoever runs a job (this process, a local worker or a torchrun
    rank) loads the training split and keeps that class, so no images are shipped to the workers.
    """
    import torch

    from .. import distributed

    method_options = {k: v for k, v in options.items() if k not in ("ipc", "seed", "progress")}
    jobs = [distributed.ClassJob.from_dataset(args.method, method_options, args.ipc, args.seed, info.name, c,
                                              root=args.data_root, num_classes=info.num_classes, meta=info.meta())
            for c in classes]
    if not distributed.launched_by_torchrun():
        # fork: this process has imported torch but run no parallel torch work, so the workers can be copies of it;
        # not once CUDA was asked about (a forked process cannot use CUDA after its parent initialised the driver)
        start = "fork" if args.device == "cpu" else "spawn"
        parts = distributed.distill_per_class(jobs, workers=args.workers, timeout=args.worker_timeout, start_method=start)
        return distributed.merge_parts(parts, workers=args.workers)
    if args.workers not in (None, 1):
        raise ValueError("--workers cannot be combined with torchrun: torchrun already started the workers")
    group = distributed.init_from_env(timeout=args.worker_timeout)
    try:
        parts = distributed.distill_per_class(jobs, group=group, timeout=args.worker_timeout)
        rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    finally:
        torch.distributed.destroy_process_group()
    return distributed.merge_parts(parts, workers=world) if rank == 0 else None


def _distill_command(args) -> int:
    from .. import distributed
    from ..cli import CLIError
    from ..data import dataset_info, load_tensors
    from . import REGISTRY, make

    distributed.trace("cli_start")
    info = dataset_info(args.dataset)
    classes = _parse_classes(args.classes, info.num_classes)
    options = {"ipc": args.ipc, "seed": args.seed, "progress": not args.quiet, "device": args.device}
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
    if args.workers is not None or distributed.launched_by_torchrun():
        try:  # every class of the dataset is in its training split
            buffer = _distill_per_class(args, options, classes or list(range(info.num_classes)), info)
        except distributed.DistributedDistillError as exc:
            raise CLIError(str(exc)) from None
        if buffer is None:
            return 0  # a torchrun rank other than 0: rank 0 writes
    else:
        import torch

        images, labels = load_tensors(info.name, train=True, root=args.data_root)
        if classes is not None:
            keep = torch.isin(labels, torch.tensor(classes))
            images, labels = images[keep], labels[keep]
        distributed.trace("data_ready")
        buffer = distiller.distill(images, labels, num_classes=info.num_classes, meta=info.meta())
        distributed.trace("distilled")
    path = buffer.save(args.out, storage=args.storage)
    distributed.trace("saved")
    distributed.write_trace("parent")
    print(f"{buffer!r} -> {path} ({buffer.meta['distill_seconds']:.1f} s)")
    if args.png:
        from ..viz import save_buffer_grid

        save_buffer_grid(buffer, args.png)
        print(f"grid -> {args.png}")
    return 0


def add_cli(sub) -> None:
    from ..device import add_device_argument

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
    add_device_argument(p, "the distillation")
    p.add_argument("--workers", type=int,
                   help="distill each class as one job over N local processes of one thread each (1: here, one "
                        "thread); same buffer for any N. Under torchrun the ranks are the workers")
    p.add_argument("--worker-timeout", type=float, default=1800.0,
                   help="seconds a worker waits for another to finish its jobs before the run fails naming it; a "
                        "worker that hangs or dies is named after half of this, at most 60 s (default 1800)")
    p.set_defaults(func=_distill_command)
