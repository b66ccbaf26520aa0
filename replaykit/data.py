"""Datasets, found offline under a data root and read with torchvision's own classes.

The data root is, in order: the ``root`` argument, ``$REPLAYKIT_DATA``, the
``shared/data`` folder beside this repository (CI and development), or a user
cache folder. Nothing is downloaded unless the caller asks (``download=True``,
or :func:`ensure_datasets` with ``download=True``, which the test session uses on
a machine that has no data root: see ``tests/conftest.py``).

The data root is never written to (it may be shared and read-only): the
canonical ``.gz`` / ``.tar.gz`` files are checked against torchvision's md5 sums
and unpacked into a cache folder (``$REPLAYKIT_CACHE``, default
``~/.cache/replaykit``), which torchvision then reads with ``download=False``.

Images come back as float32 ``[N, C, H, W]`` tensors normalised with the training
set's per-channel mean and std, labels as int64 ``[N]``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_write

__all__ = [
    "DatasetInfo",
    "DatasetNotFoundError",
    "DATASETS",
    "data_root",
    "cache_dir",
    "dataset_info",
    "ensure_datasets",
    "expected_files",
    "load_dataset",
    "load_tensors",
    "normalize",
    "denormalize",
]

_REPO_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not under the data root."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: shape, classes and normalisation."""

    name: str
    in_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = field(default=())

    def meta(self) -> dict:
        """JSON metadata that buffers and bundles carry about their dataset."""
        return {
            "dataset": self.name,
            "in_shape": list(self.in_shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": list(self.class_names),
        }


_DIGITS = tuple(str(i) for i in range(10))
# Per-channel mean / std of each training set (checked against the data by the tests).
DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), _DIGITS),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", (1, 28, 28), 10, (0.2860,), (0.3530,),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "cifar10": DatasetInfo(
        "cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
    # scikit-learn's 8x8 digits scaled to [0, 1]; ships inside scikit-learn, so it is always there.
    "digits": DatasetInfo("digits", (1, 8, 8), 10, (0.3049,), (0.3759,), _DIGITS),
}
_ALIASES = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10", "sklearn-digits": "digits"}
_DIGITS_TEST_FRACTION = 0.2


def _canonical(name: str) -> str:
    key = name.lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a dataset by name (aliases like ``fmnist`` work)."""
    return DATASETS[_canonical(name)]


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Resolve the data root: argument, ``$REPLAYKIT_DATA``, ``../shared/data``, user cache."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("REPLAYKIT_DATA")
    if env:
        return Path(env).expanduser()
    if _REPO_SHARED_DATA.is_dir():
        return _REPO_SHARED_DATA
    return cache_dir() / "data"


def cache_dir() -> Path:
    """Writable folder for unpacked datasets (``$REPLAYKIT_CACHE`` or ``~/.cache/replaykit``)."""
    env = os.environ.get("REPLAYKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "replaykit"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _torchvision_class(key: str):
    from torchvision import datasets

    return {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[key]


def _expected(key: str, root: Path) -> list[tuple[Path, str]]:
    """(path under ``root``, torchvision's md5) of each canonical archive of a dataset."""
    if key == "digits":
        return []  # ships inside scikit-learn
    cls = _torchvision_class(key)
    if key == "cifar10":
        return [(root / cls.filename, cls.tgz_md5)]
    return [(root / cls.__name__ / "raw" / filename, md5) for filename, md5 in cls.resources]


def expected_files(name: str, root: str | os.PathLike) -> list[Path]:
    """The canonical archives of a torchvision dataset, where they belong under ``root``."""
    return [path for path, _ in _expected(_canonical(name), Path(root))]


def _lacking(keys: list[str], root: Path, verify: bool) -> list[str]:
    """The datasets with a file missing under ``root`` (or, with ``verify``, one failing its md5)."""
    return [
        key for key in keys
        if any(not path.is_file() or (verify and _md5(path) != md5) for path, md5 in _expected(key, root))
    ]


def _put_files_hint(keys: list[str], root: Path) -> str:
    """Which files to put where, for an error message."""
    paths = [str(path) for key in keys for path in expected_files(key, root)]
    return "Put these files there (the canonical archives, md5-checked against torchvision's sums): " + ", ".join(paths)


def _download_failed(keys: list[str], root: Path, exc: BaseException | None) -> DatasetNotFoundError:
    reason = f"{type(exc).__name__}: {exc}".strip() if exc is not None else "no reason given"
    return DatasetNotFoundError(f"could not download {', '.join(keys)} into {root} ({reason}). {_put_files_hint(keys, root)}")


def ensure_datasets(names: list[str] | tuple[str, ...], root: str | os.PathLike, *, download: bool) -> list[str]:
    """Make sure ``root`` holds the canonical files of ``names``; return the names downloaded.

    A dataset whose files are all there is never downloaded. With ``download=False`` a missing
    file raises :class:`DatasetNotFoundError`; with ``download=True`` torchvision fetches it
    (md5-checked; a file cut short by an interrupted download fails its md5 and is fetched again)
    and an unreachable network raises the same error, naming the files to put there.
    """
    root = Path(root).expanduser()
    missing = _lacking([_canonical(name) for name in names], root, verify=download)
    if missing and not download:
        raise DatasetNotFoundError(f"{', '.join(missing)} not under the data root {root}. {_put_files_hint(missing, root)}")
    for i, key in enumerate(missing):
        try:
            load_dataset(key, root=root, download=True)
        except DatasetNotFoundError as exc:  # name every file still needed, not just this dataset's
            raise _download_failed(missing[i:], root, exc.__cause__) from exc.__cause__
    still = _lacking(missing, root, verify=False)
    if still:  # torchvision skips the download when unpacked files are there without their archives
        raise DatasetNotFoundError(f"{', '.join(still)} still incomplete under {root}. {_put_files_hint(still, root)}")
    return missing


def _unpack_idx(key: str, root: Path) -> Path:
    """Unpack MNIST-style ``raw/*.gz`` from ``root`` into the cache; return the cache root."""
    cls = _torchvision_class(key)
    src = root / cls.__name__ / "raw"
    dst_root = cache_dir() / "torchvision"
    dst = dst_root / cls.__name__ / "raw"
    missing = [name for name, _ in cls.resources if not (src / name).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{cls.__name__} is not under the data root {root}: missing {', '.join(missing)} in {src}. "
            f"Put the four canonical *-idx?-ubyte.gz files there, set REPLAYKIT_DATA, or pass download=True (--download)."
        )
    for name, md5 in cls.resources:
        out = dst / name[: -len(".gz")]
        stamp = dst / (name + ".md5")
        if out.is_file() and stamp.is_file() and stamp.read_text() == md5:
            continue
        actual = _md5(src / name)
        if actual != md5:
            raise ValueError(f"{src / name} is corrupt or not the canonical file: md5 {actual}, torchvision expects {md5}")
        dst.mkdir(parents=True, exist_ok=True)

        def unzip(tmp: Path, source: Path = src / name) -> None:
            with gzip.open(source, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)

        atomic_write(out, unzip)
        atomic_write(stamp, lambda tmp, m=md5: tmp.write_text(m))
    return dst_root


def _unpack_cifar(root: Path) -> Path:
    from torchvision.datasets import CIFAR10

    if (root / CIFAR10.base_folder).is_dir():
        return root
    archive = root / CIFAR10.filename
    if not archive.is_file():
        raise DatasetNotFoundError(
            f"CIFAR-10 is not under the data root {root}: expected {root / CIFAR10.base_folder}/, {archive}, or lossless PNGs in "
            f"class folders ({root}/cifar10/train/airplane/*.png ... and test/...). "
            f"Put the files there, set REPLAYKIT_DATA, or pass download=True (--download)."
        )
    dst_root = cache_dir() / "torchvision"
    if not (dst_root / CIFAR10.base_folder).is_dir():
        actual = _md5(archive)
        if actual != CIFAR10.tgz_md5:
            raise ValueError(f"{archive} is corrupt or not the canonical file: md5 {actual}, expected {CIFAR10.tgz_md5}")
        dst_root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(dst_root, filter="data")
    return dst_root


#: Folder names under the data root that may hold CIFAR-10 as lossless PNGs, ``<split>/<class name>/*.png``.
CIFAR10_PNG_FOLDERS = ("cifar10", "CIFAR-10-dataset", "cifar10-png")


def cifar10_png_folder(root: str | os.PathLike | None = None) -> Path | None:
    """The folder holding CIFAR-10 as PNGs in class folders (``train/airplane/...``), if the data root has one."""
    base = data_root(root)
    for candidate in (base, *(base / name for name in CIFAR10_PNG_FOLDERS)):
        if (candidate / "train" / DATASETS["cifar10"].class_names[0]).is_dir():
            return candidate
    return None


def _png_split(folder: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[N, 32, 32, 3]`` and int64 labels of one split of the PNG layout (files in name order per class).

    Decoding 50,000 PNGs takes minutes on a cold disk, so the decoded split is cached (plain ``.npy``,
    never pickled) under ``$REPLAYKIT_CACHE``, keyed by every file's name and size.
    """
    from PIL import Image

    info = DATASETS["cifar10"]
    split = folder / ("train" if train else "test")
    listing = []
    for label, name in enumerate(info.class_names):
        files = sorted((split / name).glob("*.png")) if (split / name).is_dir() else []
        if not files:
            raise DatasetNotFoundError(f"CIFAR-10 PNG layout at {folder}: no PNG files in {split / name}")
        listing += [(path, label) for path in files]
    key = hashlib.sha256("\n".join(f"{p.relative_to(folder)}:{p.stat().st_size}" for p, _ in listing).encode()).hexdigest()[:16]
    cached = cache_dir() / "cifar10-png" / f"{split.name}-{key}.npy"
    labels = np.asarray([label for _, label in listing], dtype=np.int64)
    if cached.is_file():
        pixels = np.load(cached, allow_pickle=False)
        if pixels.shape == (len(listing), 32, 32, 3) and pixels.dtype == np.uint8:
            return pixels, labels
    images = []
    for path, _ in listing:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        if pixels.shape != (32, 32, 3):
            raise ValueError(f"{path}: expected a 32x32 RGB image, found shape {pixels.shape}")
        images.append(pixels)
    pixels = np.stack(images)
    cached.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, pixels, allow_pickle=False)

    atomic_write(cached, write)
    return pixels, labels


def load_dataset(name: str, train: bool = True, root: str | os.PathLike | None = None, download: bool = False):
    """The torchvision dataset object for ``name`` (not for ``digits``), read offline.

    With ``download=True`` torchvision fetches missing files into ``root`` (or the
    user cache when no root is given) — the only path that touches the network.
    """
    key = _canonical(name)
    if key == "digits":
        raise ValueError("'digits' is scikit-learn's dataset, not a torchvision one; use load_tensors('digits')")
    cls = _torchvision_class(key)
    if download:
        target = Path(root).expanduser() if root is not None else cache_dir() / "data"
        try:
            return cls(str(target), train=train, download=True)
        except (OSError, RuntimeError) as exc:  # torchvision's errors when no mirror answers
            raise _download_failed([key], target, exc) from exc
    base = data_root(root)
    prepared = _unpack_cifar(base) if key == "cifar10" else _unpack_idx(key, base)
    return cls(str(prepared), train=train, download=False)


def _digits_tensors(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))  # fixed split, independent of any user seed
    n_test = int(round(len(labels) * _DIGITS_TEST_FRACTION))
    idx = order[n_test:] if train else order[:n_test]
    idx = np.sort(idx)
    return torch.from_numpy(images[idx]).unsqueeze(1), torch.from_numpy(labels[idx])


def normalize(images01: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Map images in [0, 1] to the dataset's normalised space."""
    mean = torch.tensor(info.mean, dtype=images01.dtype).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=images01.dtype).view(1, -1, 1, 1)
    return (images01 - mean) / std


def denormalize(images: torch.Tensor, info: DatasetInfo | None = None, mean=None, std=None) -> torch.Tensor:
    """Map normalised images back to [0, 1] pixel space (not clipped)."""
    if info is not None:
        mean, std = info.mean, info.std
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return images * std_t + mean_t


def load_tensors(
    name: str,
    train: bool = True,
    root: str | os.PathLike | None = None,
    download: bool = False,
    normalized: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, C, H, W]`` float32 and labels ``[N]`` int64 of a whole split.

    ``normalized=False`` gives pixels in [0, 1].
    """
    key = _canonical(name)
    info = DATASETS[key]
    if key == "digits":
        images, labels = _digits_tensors(train)
    elif key == "cifar10" and not download and (png := cifar10_png_folder(root)) is not None:
        pixels, label_array = _png_split(png, train)
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
        labels = torch.from_numpy(label_array)
    else:
        ds = load_dataset(key, train=train, root=root, download=download)
        data = torch.as_tensor(np.asarray(ds.data))
        if data.ndim == 3:  # MNIST-style [N, H, W]
            data = data.unsqueeze(1)
        else:  # CIFAR-style [N, H, W, C]
            data = data.permute(0, 3, 1, 2)
        images = data.contiguous().float().div_(255.0)
        labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    if tuple(images.shape[1:]) != info.in_shape:
        raise ValueError(f"{key}: expected images of shape {info.in_shape}, found {tuple(images.shape[1:])}")
    return (normalize(images, info) if normalized else images), labels


def _data_command(args) -> int:
    root = data_root(args.root)
    print(f"data root: {root}")
    print(f"cache:     {cache_dir()}")
    for key in args.datasets or sorted(DATASETS):
        key = _canonical(key)
        try:
            x, _ = load_tensors(key, train=True, root=args.root, download=args.download)
            xt, _ = load_tensors(key, train=False, root=args.root, download=False)
            status = f"ok: {len(x)} train / {len(xt)} test images of shape {tuple(x.shape[1:])}"
        except DatasetNotFoundError as exc:
            status = f"missing ({exc})"
        print(f"  {key:<14} {status}")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser(
        "data",
        help="show which datasets are found under the data root",
        description="List the datasets ReplayKit can read offline (and, with --download, fetch the missing ones).",
    )
    p.add_argument("datasets", nargs="*", help=f"dataset names (default: all of {', '.join(sorted(DATASETS))})")
    p.add_argument("--root", help="data root (default: $REPLAYKIT_DATA, ../shared/data, or the user cache)")
    p.add_argument("--download", action="store_true", help="download missing datasets with torchvision (needs internet)")
    p.set_defaults(func=_data_command)
