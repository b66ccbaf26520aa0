"""``evaluate_buffer`` (PROTOCOL B), the privacy check, and the ``replaykit distill`` / ``replaykit evaluate`` commands."""

from __future__ import annotations

import json

import pytest
import torch

from replaykit import distill
from replaykit.buffer import SyntheticBuffer
from replaykit.cli import main
from replaykit.data import load_tensors
from replaykit.evaluate import evaluate_buffer, nearest_real_distance, privacy_check


@pytest.fixture(scope="module")
def digits():
    x, y = load_tensors("digits", train=True)
    xt, yt = load_tensors("digits", train=False)
    return x, y, xt, yt


def test_nearest_real_distance_is_exact():
    real = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]]).reshape(3, 1, 1, 2)
    q = torch.tensor([[0.0, 0.0], [3.0, 0.0]]).reshape(2, 1, 1, 2)
    assert nearest_real_distance(q, real).tolist() == pytest.approx([0.0, 3.0])
    # excluding the identical image, (0, 0)'s nearest other real image is (3, 4) at distance 5
    assert nearest_real_distance(real[:1], real, exclude_self=True).tolist() == pytest.approx([5.0])


def test_evaluate_buffer_trains_on_the_buffer_and_reports_per_architecture(digits):
    x, y, xt, yt = digits
    good = distill.make("random", ipc=10, seed=0, progress=False).distill(x, y, meta={"dataset": "digits"})
    res = evaluate_buffer(good, xt, yt, networks=("convnet", "mlp"), num_networks=2, epochs=40, width=16, batch_size=20,
                          train_images=x, progress=False)
    assert len(res["per_network"]["convnet"]) == 2 and len(res["per_network"]["mlp"]) == 2
    assert res["convnet"]["mean"] == pytest.approx(sum(res["per_network"]["convnet"]) / 2)
    assert res["convnet"]["std"] >= 0 and res["drop"]["mlp"] == pytest.approx(res["convnet"]["mean"] - res["mlp"]["mean"])
    assert res["convnet"]["mean"] > 0.6  # 100 real digits train a small ConvNet far above chance (0.1)
    # The buffer is a real subset: every image is an exact copy of a training image.
    assert res["privacy"]["synthetic_exact_copies"] == len(good) and res["privacy"]["synthetic_median"] == 0
    assert res["privacy"]["real_subset_median"] > 0
    # Shuffled labels teach nothing: evaluation really depends on the buffer's content.
    shuffled = SyntheticBuffer(good.images, good.labels[torch.randperm(len(good), generator=torch.Generator().manual_seed(0))],
                               10, meta=good.meta)
    bad = evaluate_buffer(shuffled, xt, yt, num_networks=1, epochs=40, width=16, batch_size=20, progress=False)
    assert bad["convnet"]["mean"] < res["convnet"]["mean"] - 0.3
    # Same seed, same numbers.
    again = evaluate_buffer(good, xt, yt, networks=("convnet",), num_networks=1, epochs=40, width=16, batch_size=20, progress=False)
    assert again["per_network"]["convnet"][0] == res["per_network"]["convnet"][0]


def test_bad_input_is_refused(digits):
    x, y, xt, yt = digits
    buf = distill.make("random", ipc=1, progress=False).distill(x, y)
    with pytest.raises(ValueError, match="test images must be"):
        evaluate_buffer(buf, xt[:, :, :4], yt, progress=False)
    with pytest.raises(ValueError, match="test labels"):
        evaluate_buffer(buf, xt, yt[:-1], progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        evaluate_buffer(buf, xt, yt + 5, progress=False)
    with pytest.raises(ValueError, match="unknown network"):
        evaluate_buffer(buf, xt, yt, networks=("resnet",), epochs=1, progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate_buffer(SyntheticBuffer.empty((1, 8, 8), 10), xt, yt, progress=False)
    with pytest.raises(ValueError, match="shape"):
        privacy_check(buf, torch.zeros(5, 1, 28, 28))


def test_distill_and_evaluate_commands(tmp_path, capsys):
    out = tmp_path / "buf.safetensors"
    assert main(["distill", "--dataset", "digits", "--method", "dm", "--ipc", "1", "--classes", "0,1",
                 "--iterations", "3", "--out", str(out), "--png", str(tmp_path / "grid.png"), "--quiet"]) == 0
    buf = SyntheticBuffer.load(out)
    assert buf.counts() == {0: 1, 1: 1} and buf.meta["method"] == "dm" and buf.meta["iterations_done"] == 3
    assert buf.meta["dataset"] == "digits" and (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(out), "--num-networks", "1", "--epochs", "5", "--width", "8", "--networks", "convnet,lenet",
                 "--json", str(report), "--quiet"]) == 0
    doc = json.loads(report.read_text())
    assert doc["dataset"] == "digits" and set(doc["per_network"]) == {"convnet", "lenet"} and "privacy" in doc
    assert "convnet" in capsys.readouterr().out
    # user errors exit 2 with a message naming the problem
    assert main(["distill", "--dataset", "digits", "--method", "nope", "--out", str(out)]) == 2
    assert "unknown distillation method 'nope'" in capsys.readouterr().err
    assert main(["distill", "--dataset", "digits", "--method", "herding", "--iterations", "3", "--out", str(out)]) == 2
    assert "does not take --iterations" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.safetensors")]) == 2


def test_low_resolution_buffer_is_decoded_before_training_and_testing(digits):
    x, y, xt, yt = digits
    real = distill.make("random", ipc=10, seed=0, progress=False).distill(x, y, meta={"dataset": "digits"})
    small = torch.nn.functional.avg_pool2d(real.images, 2)  # 4x4 storage of the same 100 digits
    low = SyntheticBuffer(small, real.labels, 10, meta={**real.meta, "decoder": {"kind": "upsample", "factor": 2, "mode": "bilinear"}})
    res = evaluate_buffer(low, xt, yt, num_networks=1, epochs=40, width=16, batch_size=20, train_images=x, progress=False)
    assert res["config"]["decoder_factor"] == 2 and len(res["seconds"]["convnet"]) == 1 and res["seconds"]["convnet"][0] > 0
    assert res["convnet"]["mean"] > 0.25  # measured 0.39: blurred 4x4 digits still teach above chance (0.1)
    # The privacy check measures the decoded images: blurred copies are no longer exact copies.
    assert res["privacy"]["synthetic_exact_copies"] == 0 and res["privacy"]["synthetic_median"] > 0
    with pytest.raises(ValueError, match=r"test images must be \[N, 1, 8, 8\]"):
        evaluate_buffer(low, torch.nn.functional.avg_pool2d(xt, 2), yt, progress=False)


def test_explicit_cpu_device_gives_the_same_numbers_and_a_bad_device_is_named(digits):
    x, y, xt, yt = digits
    buf = distill.make("random", ipc=3, seed=0, progress=False).distill(x, y, meta={"dataset": "digits"})
    kwargs = dict(networks=("convnet",), num_networks=1, epochs=5, width=8, batch_size=20, progress=False)
    default = evaluate_buffer(buf, xt, yt, **kwargs)
    explicit = evaluate_buffer(buf, xt, yt, device=torch.device("cpu"), **kwargs)
    assert explicit["config"]["device"] == default["config"]["device"] == "cpu"
    assert explicit["per_network"] == default["per_network"]
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        evaluate_buffer(buf, xt, yt, device="gpu", **kwargs)


@pytest.mark.cuda
def test_evaluate_buffer_on_cuda_trains_there_and_scores_like_the_cpu(digits):
    x, y, xt, yt = digits
    buf = distill.make("random", ipc=10, seed=0, progress=False).distill(x, y, meta={"dataset": "digits"})
    kwargs = dict(networks=("convnet",), num_networks=1, epochs=40, width=16, batch_size=20, progress=False)
    cpu = evaluate_buffer(buf, xt, yt, **kwargs)
    gpu = evaluate_buffer(buf, xt.cuda(), yt.cuda(), device="cuda", **kwargs)
    assert gpu["config"]["device"] == "cuda" and abs(gpu["convnet"]["mean"] - cpu["convnet"]["mean"]) < 0.05
