"""Every registered method builds, distills a tiny set, and round-trips through the buffer format; bad input is refused clearly."""

from __future__ import annotations

import inspect

import pytest
import torch

from replaykit import distill
from replaykit.buffer import SyntheticBuffer
from replaykit.networks import ConvNet


def _tiny_options(name: str) -> dict:
    """The cheapest sensible options for ``name`` (whatever its constructor accepts)."""
    cls = distill.REGISTRY[name]
    accepted = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            accepted |= set(inspect.signature(klass.__init__).parameters)
    cheap = {"iterations": 2, "feature_epochs": 1, "width": 16, "feature_width": 8, "real_batch": 8}
    options = {k: v for k, v in cheap.items() if k in accepted}
    if getattr(cls, "needs_learner", False):  # an untrained network stands in for the learner
        torch.manual_seed(0)
        options["learner"] = ConvNet((1, 8, 8), 10, width=8, depth=2)
    return options


@pytest.fixture(scope="module")
def tiny(digits):
    x, y, _, _ = digits
    keep = torch.cat([torch.nonzero(y == c).flatten()[:12] for c in (1, 4, 7)])
    return x[keep], y[keep]


def test_expected_methods_are_registered():
    assert {"random", "dm", "dm-multi", "herding", "kcenter"} <= set(distill.available())
    assert distill.available() == sorted(distill.available())


@pytest.mark.parametrize("name", distill.available())
def test_every_method_distills_and_round_trips(name, tiny, tmp_path):
    x, y = tiny
    buf = distill.make(name, ipc=2, seed=0, progress=False, **_tiny_options(name)).distill(
        x, y, num_classes=10, meta={"dataset": "digits"}
    )
    assert buf.num_classes == 10 and buf.counts() == {1: 2, 4: 2, 7: 2}
    assert buf.images.shape == (6, 1, 8, 8) and torch.isfinite(buf.images).all()
    assert buf.meta["method"] == name and buf.meta["ipc"] == 2 and buf.meta["seed"] == 0
    assert buf.meta["distill_seconds"] >= 0 and buf.meta["dataset"] == "digits"
    if distill.REGISTRY[name].selects:  # selection baselines return real images of the right class
        for img, c in zip(buf.images, buf.class_ids):
            assert any(torch.equal(img, r) for r in x[y == c])
    path = buf.save(tmp_path / f"{name}.safetensors")
    back = SyntheticBuffer.load(path)
    assert torch.equal(back.images, buf.images) and torch.equal(back.labels, buf.labels)
    assert back.meta["method"] == name and back.meta["options"] == buf.meta["options"]


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown distillation method 'dmx'.*available: .*dm"):
        distill.make("dmx")


@pytest.mark.parametrize("name", ["dm", "dm-multi", "herding", "kcenter"])
def test_bad_input_is_refused_with_a_named_problem(name, tiny):
    x, y = tiny
    d = distill.make(name, ipc=2, progress=False, **_tiny_options(name))
    with pytest.raises(ValueError, match="class 7 has 1: fewer real images than the 2"):
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[torch.nonzero(y == 7).flatten()[1:]] = False
        d.distill(x[keep], y[keep])
    bad = x.clone()
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        d.distill(bad, y)
    with pytest.raises(ValueError, match="36 images but 35 labels"):
        d.distill(x, y[:-1])
    with pytest.raises(ValueError, match="no training images"):
        d.distill(x[:0], y[:0])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\]"):
        d.distill(x, y, num_classes=5)
    with pytest.raises(ValueError, match="ipc"):
        distill.make(name, ipc=0)


# ------------------------------------------------------------------ devices
@pytest.mark.parametrize("name", distill.available())
def test_every_method_takes_device_cpu_and_gives_the_same_host_buffer(name, tiny):
    x, y = tiny
    default = distill.make(name, ipc=1, seed=0, progress=False, **_tiny_options(name)).distill(x, y, num_classes=10)
    explicit = distill.make(name, ipc=1, seed=0, progress=False, device=torch.device("cpu"), **_tiny_options(name)).distill(
        x, y, num_classes=10)
    assert distill.make(name, ipc=1, device="cpu").device == "cpu"
    assert explicit.meta["options"]["device"] == "cpu"
    assert explicit.images.device.type == explicit.labels.device.type == explicit.class_ids.device.type == "cpu"
    assert torch.equal(explicit.images, default.images) and torch.equal(explicit.labels, default.labels)


@pytest.mark.parametrize("name", distill.available())
def test_every_method_names_a_bad_device(name):
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        distill.make(name, ipc=1, device="gpu")


@pytest.mark.cuda
@pytest.mark.parametrize("name", distill.available())
def test_every_method_runs_on_cuda_and_returns_a_host_buffer(name, tiny):
    x, y = tiny
    cpu = distill.make(name, ipc=2, seed=0, progress=False, **_tiny_options(name)).distill(x, y, num_classes=10)
    gpu = distill.make(name, ipc=2, seed=0, progress=False, device="cuda", **_tiny_options(name)).distill(x.cuda(), y.cuda(),
                                                                                                        num_classes=10)
    assert gpu.images.device.type == gpu.labels.device.type == "cpu" and gpu.meta["options"]["device"] == "cuda"
    assert gpu.images.shape == cpu.images.shape and gpu.class_ids.tolist() == cpu.class_ids.tolist()
    if distill.REGISTRY[name].selects and name == "random":
        assert torch.equal(gpu.images, cpu.images)  # host-drawn choice: the same images on every device


def test_a_method_without_device_still_builds_on_the_cpu_and_refuses_cuda(monkeypatch, tiny):
    from replaykit.distill.base import DistillResult, Distiller

    class FirstImages(Distiller):  # written against the interface before device= existed
        name = "first-images-test"
        selects = True

        def __init__(self, ipc: int = 1, *, seed: int = 0, progress: bool = True) -> None:
            super().__init__(ipc, seed=seed, progress=progress)

        def _distill(self, images, labels, classes, num_classes):
            index = torch.cat([torch.nonzero(labels == c).flatten()[: self.ipc] for c in classes])
            return DistillResult(images[index].clone(), labels[index].clone(), labels[index].clone())

    monkeypatch.setitem(distill.REGISTRY, FirstImages.name, FirstImages)
    x, y = tiny
    assert len(distill.make(FirstImages.name, ipc=1, device="cpu").distill(x, y)) == 3
    monkeypatch.setattr("replaykit.device.resolve_device", torch.device)  # lets "cuda" through on a CPU machine
    with pytest.raises(ValueError, match="takes no device"):
        distill.make(FirstImages.name, ipc=1, device="cuda")
