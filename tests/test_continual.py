"""The class-incremental runner: PROTOCOL A's class order, every strategy kind, the metrics it reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replaykit.continual import KINDS, RunConfig, StrategySpec, class_order, forgetting, make_stream, parse_spec, run

CONFIG = RunConfig(dataset="digits", epochs=2, width=8, depth=2, batch_size=32, batch_size_mem=32, seed=1)


@pytest.fixture(scope="module")
def stream():
    torch.set_num_threads(2)
    return make_stream(CONFIG)


def test_class_order_follows_protocol_a():
    assert class_order(0) == list(range(10))
    assert class_order(1) == list(np.random.default_rng(1).permutation(10))
    assert class_order(2) != class_order(1) and sorted(class_order(2)) == list(range(10))


def test_stream_has_five_experiences_of_two_classes_in_protocol_order(stream):
    order = class_order(1)
    assert len(stream.train_stream) == 5 and len(stream.test_stream) == 5
    for i, exp in enumerate(stream.train_stream):
        assert sorted(exp.classes_in_this_experience) == sorted(order[2 * i : 2 * i + 2])
    assert sum(len(e.dataset) for e in stream.test_stream) == 359  # the whole digits test split


def test_parse_spec_and_labels():
    assert parse_spec("naive") == StrategySpec("naive")
    assert parse_spec("replay:200") == StrategySpec("replay", 200)
    spec = parse_spec("distilled:100:random:uint8")
    assert (spec.kind, spec.mem_size, spec.method, spec.storage) == ("distilled", 100, "random", "uint8")
    assert spec.label == "distilled-random M=100 uint8"
    with pytest.raises(ValueError, match="unknown strategy 'ewc'"):
        parse_spec("ewc")
    with pytest.raises(ValueError, match="needs a memory budget"):
        StrategySpec("der")
    spec = parse_spec("distilled:78500B:dm:uint8:factor=2:learner_aware=1:recompress=select:iterations=30")
    assert (spec.mem_bytes, spec.mem_size, spec.recompress) == (78500, 0, "select")
    assert spec.method_options == {"factor": 2, "iterations": 30} and spec.options == {"learner_aware": 1}
    assert spec.label == "distilled-dm 78500B uint8 factor=2 learner recompress=select"
    jpeg = parse_spec("jpeg:78500B:quality=30")
    assert (jpeg.kind, jpeg.mem_bytes, jpeg.options, jpeg.label) == ("jpeg", 78500, {"quality": 30}, "jpeg q30 78500B")
    assert parse_spec("jpeg:78500B:quality=2:mix=0.5").label == "jpeg q2 78500B mix=0.5"
    with pytest.raises(ValueError, match="budget in bytes"):
        parse_spec("downsample:100")
    with pytest.raises(ValueError, match="mean nothing"):
        parse_spec("replay:100:factor=2")


def test_forgetting_from_the_accuracy_matrix():
    matrix = [[1.0, 0.0, 0.0], [0.5, 0.9, 0.0], [0.25, 0.6, 0.8]]
    assert forgetting(matrix) == pytest.approx(((1.0 - 0.25) + (0.9 - 0.6)) / 2)
    assert forgetting([[0.7]]) is None


@pytest.mark.parametrize("kind", [k for k in KINDS])
def test_every_strategy_runs_and_respects_its_budget(stream, kind):
    if kind in ("downsample", "jpeg"):  # sized in bytes: what 20 raw uint8 digits hold (20 x (64 + 1))
        spec = StrategySpec(kind, mem_bytes=1300, options={"factor": 2} if kind == "downsample" else {"quality": 50})
        result = run(spec, CONFIG, stream)
        assert len(result.accuracy_matrix) == 5 and 0 < result.memory_bytes <= 1300
        assert result.memory_images > 20 if kind == "downsample" else result.memory_images >= 10
        return
    spec = StrategySpec(kind, 0 if kind in ("naive", "joint") else 20, "random")
    result = run(spec, CONFIG, stream)
    rows = 1 if kind == "joint" else 5
    assert len(result.accuracy_matrix) == rows and all(len(r) == 5 for r in result.accuracy_matrix)
    assert 0.0 <= result.final_accuracy <= 1.0
    # Avalanche's stream accuracy is the sample-weighted mean of the per-experience accuracies
    sizes = np.array([len(e.dataset) for e in stream.test_stream])
    assert result.final_accuracy == pytest.approx(float(np.dot(result.accuracy_matrix[-1], sizes) / sizes.sum()), abs=1e-6)
    assert result.memory_images <= spec.mem_size
    if kind in ("naive", "joint"):
        assert result.memory_images == 0 and result.memory_bytes == 0
    else:
        assert result.memory_images == 20 and result.memory_bytes >= 20 * 64
    if kind == "distilled":
        assert len(result.distill_seconds) == 5 and result.buffer.counts() == {c: 2 for c in range(10)}
    assert result.to_json()["label"] == spec.label


def test_same_seed_same_result(stream):
    spec = StrategySpec("distilled", 20, "random")
    a, b = run(spec, CONFIG, stream), run(spec, CONFIG, stream)
    assert a.accuracy_matrix == b.accuracy_matrix
    assert torch.equal(a.buffer.images, b.buffer.images)


def test_validation_stream_is_carved_from_the_training_set():
    from replaykit.data import load_tensors

    val = make_stream(RunConfig(**{**CONFIG.__dict__, "validation": True}))
    n_train = len(load_tensors("digits")[1])
    n_val = sum(len(e.dataset) for e in val.test_stream)
    assert n_val == n_train // 10
    assert n_val + sum(len(e.dataset) for e in val.train_stream) == n_train


def test_run_config_device_reaches_the_strategy_and_a_bad_one_is_named():
    from replaykit.continual import make_strategy

    strategy = make_strategy(StrategySpec("naive"), RunConfig(**{**CONFIG.__dict__, "device": "cpu"}))
    assert torch.device(strategy.device) == torch.device("cpu") and RunConfig().device == "cpu"
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        make_strategy(StrategySpec("naive"), RunConfig(**{**CONFIG.__dict__, "device": "gpu"}))


@pytest.mark.parametrize("text", ["distilled:2000B:random:jpeg:quality=2:recompress=select:logits=1:mix=0.5:augment=1",
                                  "jpeg:1300B:quality=50:mix=0.5", "downsample:1300B:factor=2:mix=0.5"])
def test_the_user_paths_with_an_explicit_device_run_the_same_as_the_default(stream, text):
    """The issue's crashing paths (held logits, JPEG views, mixing, augmentation) with the device passed explicitly."""
    spec = parse_spec(text)
    default = run(spec, CONFIG, stream)
    explicit = run(spec, RunConfig(**{**CONFIG.__dict__, "device": "cpu"}), stream)
    assert explicit.accuracy_matrix == default.accuracy_matrix and explicit.memory_bytes == default.memory_bytes


@pytest.mark.cuda
@pytest.mark.parametrize("text", ["distilled:2000B:random:jpeg:quality=2:recompress=select:logits=1:mix=0.5:augment=1",
                                  "distilled:2000B:dm:uint8:bits=2:iterations=5:recompress=select:learner_aware=1",
                                  "jpeg:1300B:quality=50:mix=0.5", "downsample:1300B:factor=2:mix=0.5", "der:20"])
def test_the_user_paths_run_on_cuda_with_the_buffer_on_the_host(stream, text):
    spec = parse_spec(text)
    cpu = run(spec, CONFIG, stream)
    gpu = run(spec, RunConfig(**{**CONFIG.__dict__, "device": "cuda"}), stream)
    assert len(gpu.accuracy_matrix) == 5 and abs(gpu.final_accuracy - cpu.final_accuracy) < 0.15
    if gpu.buffer is not None:
        assert gpu.buffer.images.device.type == "cpu"
        assert gpu.buffer.logits is None or gpu.buffer.logits.device.type == "cpu"
