"""Shared fixtures for distiller tests: the small, always-available ``digits`` data and a cheap evaluation."""

from __future__ import annotations

import pytest
import torch

from replaykit.augment import DSA
from replaykit.buffer import SyntheticBuffer
from replaykit.data import load_tensors
from replaykit.networks import ConvNet
from replaykit.training import accuracy, seeded, train_classifier


@pytest.fixture(scope="session")
def digits():
    """``(train_x, train_y, test_x, test_y)`` of scikit-learn's 8x8 digits (1438 / 359 images)."""
    x, y = load_tensors("digits", train=True)
    xt, yt = load_tensors("digits", train=False)
    return x, y, xt, yt


@pytest.fixture(scope="session")
def quick_accuracy():
    """``f(buffer, test_x, test_y)``: mean test accuracy of small ConvNets trained only on the buffer."""
    return _quick_accuracy


def _quick_accuracy(buffer: SyntheticBuffer, test_x: torch.Tensor, test_y: torch.Tensor, seeds=(0, 1), epochs: int = 80) -> float:
    """Mean test accuracy of small ConvNets trained only on ``buffer`` with DSA (a cheap PROTOCOL-B stand-in)."""
    accs = []
    for s in seeds:
        with seeded(s):
            net = ConvNet(buffer.image_shape, buffer.num_classes, width=32)
        train_classifier(net, buffer.images, buffer.soft_targets() if buffer.is_soft else buffer.labels,
                         epochs=epochs, lr_milestones=(epochs // 2,), augment=DSA(seed=s), seed=s)
        accs.append(accuracy(net, test_x, test_y))
    return sum(accs) / len(accs)


@pytest.fixture
def one_thread():
    """One torch thread for the test: two OpenMP threads on a loaded 2-core machine are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_pairs(digits):
    """``((train_x, train_y), (test_x, test_y))`` of the digits."""
    x, y, xt, yt = digits
    return (x, y), (xt, yt)


@pytest.fixture(scope="session")
def plain_accuracy():
    """``f(buffer, (test_x, test_y), nets=3)``: mean accuracy of plain (no augmentation) 2-block ConvNets."""
    return _plain_accuracy


def _plain_accuracy(buffer: SyntheticBuffer, test, nets: int = 3) -> float:
    xt, yt = test
    accs = []
    for s in range(nets):
        with seeded(s):
            net = ConvNet(buffer.image_shape, 10, width=32, depth=2)
        targets = buffer.soft_targets() if buffer.is_soft else buffer.labels
        train_classifier(net, buffer.images, targets, epochs=100, lr=0.01, seed=s)
        accs.append(accuracy(net, xt, yt))
    return sum(accs) / nets


@pytest.fixture(scope="session")
def mnist_small(real_data_root):
    """Five MNIST classes (0-4): 200 training images each and 100 test images each, for learning tests."""
    x, y = load_tensors("mnist", train=True, root=real_data_root)
    xt, yt = load_tensors("mnist", train=False, root=real_data_root)
    train = torch.cat([torch.nonzero(y == c).flatten()[:200] for c in range(5)])
    test = torch.cat([torch.nonzero(yt == c).flatten()[:100] for c in range(5)])
    return x[train], y[train], xt[test], yt[test]


@pytest.fixture(scope="session")
def random_accuracy(mnist_small):
    """:func:`_quick_accuracy` of the ``random`` baseline at IPC 1 on ``mnist_small`` (seed 0), computed once."""
    from replaykit import distill

    x, y, xt, yt = mnist_small
    return _quick_accuracy(distill.make("random", ipc=1, seed=0, progress=False).distill(x, y), xt, yt)
