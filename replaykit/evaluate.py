"""Distilled-set quality per PROTOCOL part B, as a function and as ``replaykit evaluate``.

Fresh networks are trained *only* on the buffer and tested on the real test set
(mean ± std over several networks); the same buffer is also scored on other
architectures (the cross-architecture drop shows whether the images overfit the
ConvNet they were distilled with); and a privacy check compares how close the
synthetic images sit to real training images with how close a random real
subset of the same size does (a real subset is at distance 0 by construction,
so the reference is its distance to the *other* training images).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Sequence

import torch

from .augment import DSA, dsa_strategy
from .buffer import SyntheticBuffer
from .device import add_device_argument, resolve_device
from .networks import make_network
from .progress import progress_bar
from .training import accuracy, seeded, train_classifier

__all__ = ["evaluate_buffer", "nearest_real_distance", "privacy_check", "add_cli"]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return float(statistics.fmean(values)), float(statistics.pstdev(values)) if len(values) > 1 else 0.0


@torch.no_grad()
def nearest_real_distance(queries: torch.Tensor, real: torch.Tensor, *, exclude_self: bool = False, batch_size: int = 256) -> torch.Tensor:
    """For each query image, the L2 distance (in the stored, normalised space) to its nearest real image.

    With ``exclude_self`` (queries drawn from ``real``) a zero distance to the
    identical image is ignored, so a real subset is compared with the *rest* of the data.
    """
    q = queries.flatten(1).double()
    r = real.flatten(1).double()
    r_sq = (r * r).sum(1)
    best = []
    for i in range(0, q.shape[0], batch_size):
        qb = q[i : i + batch_size]
        d2 = (qb * qb).sum(1, keepdim=True) + r_sq[None] - 2 * qb @ r.T
        d2.clamp_(min=0)
        if exclude_self:
            d2[d2 <= 1e-9] = math.inf
        nearest = d2.argmin(1)  # recompute the winner's distance exactly (the expansion above rounds)
        best.append((qb - r[nearest]).norm(dim=1))
    return torch.cat(best).float()


def privacy_check(buffer: SyntheticBuffer, train_images: torch.Tensor, *, seed: int = 0) -> dict[str, float]:
    """Median / min nearest-real distance of the buffer's (decoded) images next to a random real subset of equal size."""
    if tuple(train_images.shape[1:]) != buffer.decoded_shape:
        raise ValueError(f"training images have shape {tuple(train_images.shape[1:])}, buffer images {buffer.decoded_shape}")
    syn = nearest_real_distance(buffer.decoded_images(), train_images)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(train_images.shape[0], generator=gen)[: len(buffer)]
    ref = nearest_real_distance(train_images[pick], train_images, exclude_self=True)
    return {
        "synthetic_median": float(syn.median()),
        "synthetic_min": float(syn.min()),
        "real_subset_median": float(ref.median()),
        "real_subset_min": float(ref.min()),
        "synthetic_exact_copies": int((syn < 1e-4).sum()),
    }


def _train_and_test(arch: str, index: int, *, images, targets, test_images, test_labels, shape, num_classes: int,
                    epochs: int, lr: float, batch_size: int, augment: bool, width: int, dataset: str, seed: int,
                    device: str = "cpu") -> tuple[float, float]:
    """Train one fresh network (seed ``seed * 1000 + index``) on the buffer, on ``device``; its test accuracy and seconds."""
    net_seed = seed * 1000 + index
    started = time.perf_counter()
    opts = {"width": width} if arch == "convnet" else {}
    with seeded(net_seed):
        net = make_network(arch, shape, num_classes, **opts)
    net = net.to(device)  # initialised on the host from the seed: the same start on every device
    aug = DSA(dsa_strategy(dataset), seed=net_seed) if augment else None
    train_classifier(net, images.to(device), targets.to(device), epochs=epochs, batch_size=batch_size, lr=lr,
                     lr_milestones=(epochs // 2,), augment=aug, seed=net_seed)
    return accuracy(net, test_images, test_labels), round(time.perf_counter() - started, 3)


_WORKER_SETTING: dict[str, Any] = {}


def _init_worker(setting: dict[str, Any]) -> None:
    from .runtime import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()
    _WORKER_SETTING.update(setting)


def _worker_job(job: tuple[str, int]) -> tuple[float, float]:
    return _train_and_test(*job, **_WORKER_SETTING)


def _train_in_processes(jobs: list[tuple[str, int]], setting: dict[str, Any], workers: int, progress: bool) -> list[tuple[float, float]]:
    """The networks of ``jobs`` trained in ``workers`` spawned processes, results in job order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # no fork: the parent's OpenMP pool does not survive it
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context,
                             initializer=_init_worker, initargs=(setting,)) as pool:
        return list(progress_bar(pool.map(_worker_job, jobs), enabled=progress, desc="evaluate", leave=False, total=len(jobs)))


def evaluate_buffer(
    buffer: SyntheticBuffer,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    networks: Sequence[str] = ("convnet",),
    num_networks: int = 5,
    epochs: int = 300,
    lr: float = 0.01,
    batch_size: int = 256,
    augment: bool = True,
    width: int = 128,
    train_images: torch.Tensor | None = None,
    seed: int = 0,
    progress: bool = True,
    workers: int = 1,
    device: str | torch.device | None = "cpu",
) -> dict[str, Any]:
    """Train ``num_networks`` fresh networks of each architecture on ``buffer`` only; test on the real test set.

    PROTOCOL B: SGD lr 0.01, momentum 0.9, weight decay 5e-4, lr x0.1 at half the
    epochs, batch 256, DSA augmentation during training. ``width`` is the ConvNet
    width (128 in the protocol). Returns accuracies in [0, 1]: per architecture the
    list, mean and std; ``drop`` = ConvNet mean minus each other architecture's mean
    (when ConvNet is evaluated); ``seconds`` per architecture (training and testing each
    network); and ``privacy`` when ``train_images`` is given. A buffer stored at reduced
    resolution is decoded first (``buffer.decoded_images()``): networks train at the test
    images' resolution. ``workers`` > 1 trains the networks in that many spawned processes
    (one thread each, one per core); each network has its own seed, so the numbers do not
    depend on ``workers``. ``device`` (``"cpu"``, ``"cuda"``, ``"auto"``...) is where the networks
    train and test; the buffer and the data may live anywhere.
    """
    device = str(resolve_device(device))
    # the data may come on any device: scoring and the privacy check run on host copies, training on ``device``
    test_images, test_labels = test_images.cpu(), test_labels.cpu()
    train_images = None if train_images is None else train_images.cpu()
    if len(buffer) == 0:
        raise ValueError("the buffer is empty: nothing to train on")
    shape = buffer.decoded_shape
    if test_images.ndim != 4 or tuple(test_images.shape[1:]) != shape:
        raise ValueError(f"test images must be [N, {', '.join(map(str, shape))}], got {tuple(test_images.shape)}")
    if test_labels.shape != (test_images.shape[0],):
        raise ValueError(f"{test_images.shape[0]} test images but test labels of shape {tuple(test_labels.shape)}")
    if test_labels.numel() and (int(test_labels.min()) < 0 or int(test_labels.max()) >= buffer.num_classes):
        raise ValueError(f"test labels must lie in [0, {buffer.num_classes - 1}]")
    if num_networks < 1 or epochs < 1:
        raise ValueError(f"num_networks and epochs must be >= 1, got {num_networks} and {epochs}")
    images = buffer.decoded_images().detach()
    targets = buffer.soft_targets() if buffer.is_soft else buffer.labels
    dataset = str(buffer.meta.get("dataset", ""))
    results: dict[str, Any] = {"per_network": {}, "config": dict(
        networks=list(networks), num_networks=num_networks, epochs=epochs, lr=lr, batch_size=batch_size,
        augment=augment, width=width, seed=seed, buffer_images=len(buffer), decoder_factor=buffer.decoder_factor,
        device=device,
    ), "seconds": {}}
    jobs = [(arch, i) for arch in networks for i in range(num_networks)]
    setting = dict(images=images, targets=targets, test_images=test_images, test_labels=test_labels, shape=shape,
                   num_classes=buffer.num_classes, epochs=epochs, lr=lr, batch_size=batch_size, augment=augment,
                   width=width, dataset=dataset, seed=seed, device=device)
    if workers > 1 and len(jobs) > 1:
        outcomes = _train_in_processes(jobs, setting, workers, progress)
    else:
        outcomes = [_train_and_test(arch, i, **setting) for arch, i in progress_bar(jobs, enabled=progress, desc="evaluate", leave=False)]
    for (arch, _), (acc, secs) in zip(jobs, outcomes):
        results["per_network"].setdefault(arch, []).append(acc)
        results["seconds"].setdefault(arch, []).append(secs)
    for arch, accs in results["per_network"].items():
        mean, std = _mean_std(accs)
        results[arch] = {"mean": mean, "std": std}
    if "convnet" in results["per_network"]:
        results["drop"] = {a: results["convnet"]["mean"] - results[a]["mean"] for a in results["per_network"] if a != "convnet"}
    if train_images is not None:
        results["privacy"] = privacy_check(buffer, train_images, seed=seed)
    return results


def _evaluate_command(args) -> int:
    from .data import dataset_info, load_tensors

    buffer = SyntheticBuffer.load(args.buffer)
    dataset = args.dataset or buffer.meta.get("dataset")
    if not dataset:
        raise ValueError("the buffer does not name its dataset; pass --dataset")
    info = dataset_info(dataset)
    if tuple(info.in_shape) != buffer.decoded_shape:
        raise ValueError(f"buffer images decode to {buffer.decoded_shape} but {info.name} images are {tuple(info.in_shape)}")
    test_x, test_y = load_tensors(dataset, train=False, root=args.data_root)
    train_x = load_tensors(dataset, train=True, root=args.data_root)[0] if not args.no_privacy else None
    networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    res = evaluate_buffer(buffer, test_x, test_y, networks=networks, num_networks=args.num_networks, epochs=args.epochs,
                          width=args.width, augment=not args.no_augment, train_images=train_x, seed=args.seed,
                          progress=not args.quiet, device=args.device)
    res["buffer"] = str(args.buffer)
    res["dataset"] = info.name
    for arch in networks:
        line = f"{arch:8s} {100 * res[arch]['mean']:.2f} ± {100 * res[arch]['std']:.2f} %"
        if arch in res.get("drop", {}):
            line += f"   (drop vs convnet {100 * res['drop'][arch]:+.2f})"
        print(line)
    if "privacy" in res:
        p = res["privacy"]
        print(f"nearest real image: synthetic median {p['synthetic_median']:.3f}, random real subset median {p['real_subset_median']:.3f}")
    if args.json:
        from .fileio import atomic_write_json

        atomic_write_json(args.json, res)
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("evaluate", help="train fresh networks on a buffer and test them on the real test set (PROTOCOL B)")
    p.add_argument("buffer", help="a .safetensors buffer written by 'replaykit distill'")
    p.add_argument("--dataset", help="dataset of the test set (default: the buffer's metadata)")
    p.add_argument("--data-root", help="data root (default: $REPLAYKIT_DATA or ../shared/data)")
    p.add_argument("--networks", default="convnet", help="comma-separated: convnet,mlp,lenet")
    p.add_argument("--num-networks", type=int, default=5)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--width", type=int, default=128, help="ConvNet width (protocol: 128)")
    p.add_argument("--no-augment", action="store_true", help="train without DSA augmentation")
    p.add_argument("--no-privacy", action="store_true", help="skip the nearest-real-image check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--quiet", action="store_true")
    add_device_argument(p, "training and testing the networks")
    p.set_defaults(func=_evaluate_command)
