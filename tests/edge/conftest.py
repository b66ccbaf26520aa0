"""Shared, session-scoped bundles: exporting costs seconds, so each test copies one."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# ``tests/`` is on sys.path (rootdir conftest), so this folder would shadow the real
# ``edge`` package as a namespace package: put the repository root first.
_REPO = str(Path(__file__).resolve().parents[2])
if sys.path[:1] != [_REPO]:
    sys.path.insert(0, _REPO)
if getattr(sys.modules.get("edge"), "__file__", "") is None:
    del sys.modules["edge"]

OLD_CLASSES = list(range(8))


@pytest.fixture(scope="session")
def digits_split():
    """Digits (8x8) split into old classes 0-7 and new classes 8-9, train and test."""
    from replaykit.data import load_tensors

    x_train, y_train = load_tensors("digits", train=True)
    x_test, y_test = load_tensors("digits", train=False)
    return x_train, y_train, x_test, y_test


@pytest.fixture(scope="session")
def trained_model(digits_split):
    """A small ConvNet with 10 outputs trained on classes 0-7 only (room for 8 and 9)."""
    from replaykit.networks import ConvNet
    from replaykit.training import seeded, train_classifier

    torch.set_num_threads(2)
    x_train, y_train, _, _ = digits_split
    old = y_train < 8
    with seeded(0):
        model = ConvNet((1, 8, 8), 10, width=16, depth=2)
    train_classifier(model, x_train[old], y_train[old], epochs=15, batch_size=64, lr=0.01, seed=0)
    return model.eval()


@pytest.fixture(scope="session")
def replay_buffer(digits_split):
    from replaykit.distill import make

    x_train, y_train, _, _ = digits_split
    old = y_train < 8
    return make("random", ipc=10, seed=0, progress=False).distill(x_train[old], y_train[old], num_classes=10,
                                                                   meta=_digits_meta())


def _digits_meta() -> dict:
    from replaykit.data import dataset_info

    return dataset_info("digits").meta()


@pytest.fixture(scope="session")
def head_bundle(tmp_path_factory, trained_model, replay_buffer) -> Path:
    import edge

    return edge.export(trained_model, replay_buffer, tmp_path_factory.mktemp("bundles") / "head", mode="head",
                       lr=0.05, momentum=0.9)


@pytest.fixture(scope="session")
def full_bundle(tmp_path_factory, trained_model, replay_buffer) -> Path:
    import edge

    return edge.export(trained_model, replay_buffer, tmp_path_factory.mktemp("bundles") / "full", mode="full",
                       storage="float16", lr=0.02, momentum=0.9)


@pytest.fixture
def head_copy(head_bundle, tmp_path) -> Path:
    """A private copy of the head bundle that a test may modify."""
    return Path(shutil.copytree(head_bundle, tmp_path / "bundle"))


@pytest.fixture(scope="session")
def mnist_sized_bundles(tmp_path_factory):
    """``make(mode, weights)``: an untrained MNIST-sized ConvNet (28x28, width 16) exported in that mode and weight
    storage (cached for the session): big enough for memory planning to matter."""
    import edge
    from replaykit.buffer import SyntheticBuffer
    from replaykit.networks import ConvNet

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ConvNet((1, 28, 28), 10, width=16, depth=3).eval()
        images = torch.randn(40, 1, 28, 28)
    buffer = SyntheticBuffer(images, torch.arange(40) % 8, 10)
    folder = tmp_path_factory.mktemp("bundles")
    made: dict[tuple[str, str], Path] = {}

    def make(mode: str = "full", weights: str = "float32") -> Path:
        if (mode, weights) not in made:
            made[mode, weights] = edge.export(model, buffer, folder / f"mnist_{mode}_{weights}", mode=mode, weights=weights)
        return made[mode, weights]

    return make


@pytest.fixture(scope="session")
def int8_full_bundle(tmp_path_factory, trained_model, replay_buffer) -> Path:
    """The full-mode bundle of ``trained_model`` with int8 weights (same lr as ``full_bundle``, uint8 images)."""
    import edge

    return edge.export(trained_model, replay_buffer, tmp_path_factory.mktemp("bundles") / "int8_full", mode="full",
                       weights="int8", lr=0.02, momentum=0.9)


@pytest.fixture(scope="session")
def low_res_buffer(replay_buffer):
    """The replay buffer stored at half resolution (4x4 digits) with the bilinear upsampling decoder."""
    from replaykit.buffer import SyntheticBuffer

    small = torch.nn.functional.avg_pool2d(replay_buffer.images, 2)
    meta = {**replay_buffer.meta, "decoder": {"kind": "upsample", "factor": 2, "mode": "bilinear"}}
    return SyntheticBuffer(small, replay_buffer.labels.clone(), replay_buffer.num_classes, replay_buffer.class_ids.clone(), meta)


@pytest.fixture(scope="session")
def low_res_head_bundle(tmp_path_factory, trained_model, low_res_buffer) -> Path:
    import edge

    return edge.export(trained_model, low_res_buffer, tmp_path_factory.mktemp("bundles") / "low_res_head", mode="head",
                       weights="float16", lr=0.05, momentum=0.9)


@pytest.fixture(scope="session")
def host_jpeg_buffer(trained_model, replay_buffer):
    """The replay buffer as the host's headline configuration holds it: JPEG codes (quality 10) and the
    learner's logits (int8 + float16 scales)."""
    held = replay_buffer.with_meta(jpeg_quality=10).quantized("jpeg")
    with torch.no_grad():
        return held.with_logits(trained_model(held.decoded_images()))


@pytest.fixture(scope="session")
def host_jpeg_bundle(tmp_path_factory, trained_model, host_jpeg_buffer) -> Path:
    """Full mode, int8 weights, the host buffer's own JPEG codes and logits, half of every batch shown through JPEG."""
    import edge

    return edge.export(trained_model, host_jpeg_buffer, tmp_path_factory.mktemp("bundles") / "host_jpeg", mode="full",
                       weights="int8", lr=0.02, momentum=0.9, mix=0.5)
