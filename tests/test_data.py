import gzip
import os
import shutil
from pathlib import Path

import pytest
import torch

from replaykit import data
from replaykit.data import DatasetNotFoundError, data_root, dataset_info, load_dataset, load_tensors


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
