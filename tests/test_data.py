import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from replaykit import data
from replaykit.data import DatasetNotFoundError, data_root, dataset_info, ensure_datasets, load_dataset, load_tensors

REPO = Path(__file__).resolve().parents[1]
REAL_DATASETS = ("mnist", "fashion-mnist")


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*")}


@pytest.mark.parametrize(
    "name, n_train, n_test",
    [("mnist", 60000, 10000), ("fashion-mnist", 60000, 10000)],
)
def test_real_datasets_load_offline_with_sizes_and_labels(real_data_root, name, n_train, n_test):
    before = _snapshot(real_data_root)
    info = dataset_info(name)
    x, y = load_tensors(name, train=True)
    xt, yt = load_tensors(name, train=False)
    assert x.shape == (n_train, *info.in_shape) and x.dtype == torch.float32
    assert xt.shape == (n_test, *info.in_shape)
    assert y.dtype == torch.int64 and int(y.min()) == 0 and int(y.max()) == 9
    assert torch.bincount(yt, minlength=10).min() >= 890  # every class present in the test split
    # the declared normalisation statistics are the training set's own
    raw, _ = load_tensors(name, train=True, normalized=False)
    assert raw.min() >= 0 and raw.max() <= 1
    assert abs(raw.mean().item() - info.mean[0]) < 1e-3
    assert abs(raw.std().item() - info.std[0]) < 1e-3
    assert abs(x.mean().item()) < 1e-2 and abs(x.std().item() - 1) < 1e-2
    assert _snapshot(real_data_root) == before, "the data root must never be written to"


def test_torchvision_dataset_objects_are_returned(real_data_root):
    from torchvision.datasets import FashionMNIST, MNIST

    assert isinstance(load_dataset("mnist", train=False), MNIST)
    ds = load_dataset("fmnist", train=False)
    assert isinstance(ds, FashionMNIST) and len(ds) == 10000


def test_missing_dataset_names_where_files_go(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLAYKIT_DATA", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=r"train-images-idx3-ubyte.gz.*download=True"):
        load_tensors("mnist")
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10 is not under the data root"):
        load_tensors("cifar10")


def test_corrupt_archive_is_refused(real_data_root, tmp_path, monkeypatch):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (real_data_root / "MNIST" / "raw").glob("*.gz"):
        shutil.copy(f, raw / f.name)
    bad = raw / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"not mnist"))
    monkeypatch.setenv("REPLAYKIT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("REPLAYKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="corrupt or not the canonical file"):
        load_tensors("mnist", train=False)


def test_data_root_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLAYKIT_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("REPLAYKIT_DATA")
    expected = data._REPO_SHARED_DATA if data._REPO_SHARED_DATA.is_dir() else data.cache_dir() / "data"
    assert data_root() == expected


def test_embedded_digits_need_no_files(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLAYKIT_DATA", str(tmp_path))  # empty root: digits must still load
    x, y = load_tensors("digits")
    xt, yt = load_tensors("digits", train=False)
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xt) == 1797
    assert set(y.tolist()) == set(yt.tolist()) == set(range(10))
    raw, _ = load_tensors("digits", normalized=False)
    info = dataset_info("digits")
    assert abs(raw.mean().item() - info.mean[0]) < 1e-3 and abs(raw.std().item() - info.std[0]) < 1e-3
    x2, _ = load_tensors("digits")
    assert torch.equal(x, x2)  # the split is fixed


def test_unknown_dataset_and_aliases():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        dataset_info("svhn")
    assert dataset_info("FashionMNIST").name == "fashion-mnist"
    assert dataset_info("CIFAR-10").in_shape == (3, 32, 32)
    with pytest.raises(ValueError, match="scikit-learn"):
        load_dataset("digits")


def test_normalize_round_trip():
    info = dataset_info("cifar10")
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(data.denormalize(data.normalize(x, info), info), x, atol=1e-6)


def _record_downloads(monkeypatch, effect=None) -> list[str]:
    """Replace torchvision's MNIST / Fashion-MNIST download with a recorder (and ``effect``)."""
    from torchvision.datasets import MNIST

    calls: list[str] = []

    def download(self) -> None:
        calls.append(type(self).__name__)
        if effect is not None:
            effect(self)

    monkeypatch.setattr(MNIST, "download", download)  # FashionMNIST inherits it
    return calls


def test_complete_root_is_never_downloaded_into(real_data_root, monkeypatch):
    calls = _record_downloads(monkeypatch)
    before = _snapshot(real_data_root)
    assert ensure_datasets(REAL_DATASETS, real_data_root, download=True) == []
    assert calls == [] and _snapshot(real_data_root) == before


def test_unreachable_download_names_every_file_to_put_where(tmp_path, monkeypatch):
    def offline(self) -> None:
        raise RuntimeError("no mirror answered")

    _record_downloads(monkeypatch, offline)
    with pytest.raises(DatasetNotFoundError, match="not under the data root") as refused:
        ensure_datasets(REAL_DATASETS, tmp_path, download=False)
    with pytest.raises(DatasetNotFoundError, match="could not download mnist, fashion-mnist .*no mirror answered") as failed:
        ensure_datasets(REAL_DATASETS, tmp_path, download=True)
    for name in REAL_DATASETS:
        for path in data.expected_files(name, tmp_path):
            assert str(path) in str(refused.value) and str(path) in str(failed.value)


def test_archive_cut_short_is_downloaded_again(real_data_root, tmp_path, monkeypatch):
    for source, target in zip(data.expected_files("mnist", real_data_root), data.expected_files("mnist", tmp_path)):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    cut = data.expected_files("mnist", tmp_path)[-1]
    cut.write_bytes(cut.read_bytes()[:100])  # an interrupted download
    good = data.expected_files("mnist", real_data_root)[-1]
    from torchvision.datasets import MNIST

    torchvision_download = MNIST.download

    def fetch_then_unpack(self) -> None:  # the mirror's bytes arrive; torchvision verifies and unpacks them
        shutil.copy(good, cut)
        torchvision_download(self)

    calls = _record_downloads(monkeypatch, fetch_then_unpack)
    assert ensure_datasets(["mnist"], tmp_path, download=True) == ["mnist"]
    assert calls == ["MNIST"] and cut.read_bytes() == good.read_bytes()


# Loaded at interpreter start from PYTHONPATH: every connection fails, as on an offline machine.
NO_NETWORK = """
import socket

def _offline(*args, **kwargs):
    raise OSError("network disabled by the fresh-machine test")

socket.socket.connect = socket.socket.connect_ex = _offline
socket.create_connection = socket.getaddrinfo = _offline
"""


def _fresh_machine(tmp_path: Path) -> tuple[Path, dict[str, str], Path]:
    """A copy of the tracked files with no ../shared beside it, and an offline environment with an empty HOME.

    Returns the clone, the environment, and the user cache's data folder the tests will look in.
    """
    clone = tmp_path / "machine" / "replaykit"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():  # a tracked file deleted in the working tree is not copied
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    offline = tmp_path / "offline"
    offline.mkdir()
    (offline / "sitecustomize.py").write_text(NO_NETWORK)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPLAYKIT_", "PYTEST_"))}
    env.update(HOME=str(home), PYTHONPATH=str(offline), TMPDIR=str(tmp_path))
    return clone, env, home / ".cache" / "replaykit" / "data"


def _run_one_real_data_test(clone: Path, env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_data.py", "-k", "torchvision_dataset_objects", "-p", "no:cacheprovider"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=600,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_fresh_clone_offline_fails_naming_files_then_passes_with_them_in_the_cache(real_data_root, tmp_path):
    clone, env, cache = _fresh_machine(tmp_path)
    code, out = _run_one_real_data_test(clone, env)
    # the clone's own code ran: it found no data root and fell back to the (empty) user cache
    assert f"replaykit data root: {cache} (user cache" in out, out
    assert code != 0 and "could not download mnist, fashion-mnist" in out, out
    assert "network disabled by the fresh-machine test" in out, out  # it did try torchvision's download
    for name in REAL_DATASETS:
        for path in data.expected_files(name, cache):
            assert str(path) in out, (path, out)

    for name in REAL_DATASETS:
        for source, target in zip(data.expected_files(name, real_data_root), data.expected_files(name, cache)):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    code, out = _run_one_real_data_test(clone, env)
    assert code == 0 and "1 passed" in out, out  # still offline: the files in the cache were enough
    assert "replaykit: downloaded" not in out, out


def _png_layout(root: Path, per_class: int, size: int = 32) -> dict[str, list]:
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    written: dict[str, list] = {}
    for split in ("train", "test"):
        for label, name in enumerate(dataset_info("cifar10").class_names):
            folder = root / "cifar10" / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
                written.setdefault(split, []).append((label, pixels))
    return written


def test_cifar10_reads_lossless_pngs_in_class_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLAYKIT_CACHE", str(tmp_path / "cache"))
    written = _png_layout(tmp_path / "root", per_class=2)
    for _ in range(2):  # the second read comes from the decoded cache and must be the same
        x, y = load_tensors("cifar10", train=False, root=tmp_path / "root", normalized=False)
        assert x.shape == (20, 3, 32, 32) and y.tolist() == [c for c in range(10) for _ in range(2)]
        for i, (label, pixels) in enumerate(written["test"]):
            assert torch.equal((x[i] * 255).round().to(torch.uint8), torch.from_numpy(pixels).permute(2, 0, 1))


def test_cifar10_png_layout_with_a_class_missing_or_a_wrong_image_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLAYKIT_CACHE", str(tmp_path / "cache"))
    _png_layout(tmp_path / "root", per_class=1)
    shutil.rmtree(tmp_path / "root" / "cifar10" / "test" / "truck")
    with pytest.raises(DatasetNotFoundError, match="truck"):
        load_tensors("cifar10", train=False, root=tmp_path / "root")
    from PIL import Image
    import numpy as np

    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "root" / "cifar10" / "train" / "cat" / "zz.png")
    with pytest.raises(ValueError, match="32x32"):
        load_tensors("cifar10", train=True, root=tmp_path / "root")


def test_cifar10_absent_names_both_layouts(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python.tar.gz.*PNG"):
        load_tensors("cifar10", root=tmp_path)
