"""The class-incremental runner: PROTOCOL A's class order, every strategy kind, the metrics it reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from replaykit.continual import KINDS, RunConfig, StrategySpec, class_order, forgetting, make_stream, make_strategy, parse_spec, run

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
    with pytest.raises(ValueError, match="needs logits=1"):
        parse_spec("distilled:7850B:random:jpeg:quality=2:alpha=0.3")
    for bad in ("-0.1", "nan", "inf"):
        with pytest.raises(ValueError, match="'alpha' must be >= 0 and finite"):
            parse_spec(f"distilled:7850B:random:jpeg:quality=2:logits=1:alpha={bad}")
    with pytest.raises(ValueError, match="mean nothing"):
        parse_spec("replay:100:factor=2")


def test_alpha_reaches_the_logit_replay_weight():
    """``alpha`` (DER's weight on the held logits) is part of the spec and what the strategy's logit replay uses."""
    spec = parse_spec("distilled:7850B:random:jpeg:quality=2:logits=1:mix=0.5:alpha=0.3")
    assert spec.label == "distilled-random 7850B jpeg q2 logits alpha=0.3 mix=0.5"
    assert spec.identity != parse_spec("distilled:7850B:random:jpeg:quality=2:logits=1:mix=0.5").identity
    config = RunConfig(dataset="digits", width=8, train_per_class=5, test_per_class=2)
    weights = [p.logit_loss_weight for p in make_strategy(spec, config).plugins if hasattr(p, "logit_loss_weight")]
    default = [p.logit_loss_weight for p in make_strategy(parse_spec("distilled:7850B:random:jpeg:quality=2:logits=1"), config).plugins
               if hasattr(p, "logit_loss_weight")]
    assert weights == [0.3] and default == [0.1]


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


def test_booleans_parse_strictly():
    assert parse_spec("jpeg:78500B:quality=10:augment=False").options == {"quality": 10, "augment": False}
    assert parse_spec("jpeg:78500B:quality=10:augment=False").options["augment"] is False
    assert parse_spec("jpeg:78500B:augment=true").options["augment"] is True
    assert parse_spec("distilled:78500B:dm:jpeg:logits=0:soft=1").options == {"logits": False, "soft": True}
    for bad in ("yes", "False!", "2", ""):
        with pytest.raises(ValueError, match=f"augment={bad!r} is not a boolean"):
            parse_spec(f"jpeg:78500B:augment={bad}")
    with pytest.raises(ValueError, match="augment='False' must be bool"):
        StrategySpec("jpeg", mem_bytes=100, options={"augment": "False"})


def test_unknown_and_mistyped_keys_are_errors_naming_them():
    with pytest.raises(ValueError, match=r"\['iteratons'\].*method 'dm'"):
        parse_spec("distilled:78500B:dm:uint8:iteratons=100")
    with pytest.raises(ValueError, match=r"\['bits'\] mean nothing for strategy 'jpeg'"):
        parse_spec("jpeg:78500B:bits=2")
    with pytest.raises(ValueError, match="iterations='many' is not an int"):
        parse_spec("distilled:78500B:dm:uint8:iterations=many")
    with pytest.raises(ValueError, match="given twice"):
        parse_spec("jpeg:78500B:quality=2:quality=10")
    with pytest.raises(ValueError, match="method 'random' has no option 'iterations'"):
        StrategySpec("distilled", 10, "random", {"iterations": 2})
    # a selecting method's picks are held in the buffer's stored form, as its distilled twin's are
    assert parse_spec("distilled:7850B:random:uint8:factor=2:bits=2:core=1:recompress=prefix").method_options == {"factor": 2, "bits": 2}
    assert parse_spec("distilled:7850B:auto").method == "auto"
    hybrid = parse_spec("distilled:78500B:dm:jpeg:core=0.1:fill=herding:recompress=prefix")
    assert hybrid.options["fill"] == "herding" and "fill=herding" in hybrid.label
    assert hybrid.identity != parse_spec("distilled:78500B:dm:jpeg:core=0.1:recompress=prefix").identity
    complement = parse_spec("distilled:78500B:dm:jpeg:core=0.1:complement=1:recompress=prefix")
    assert complement.options["complement"] is True and "complement" in complement.label
    with pytest.raises(ValueError, match="complement='yes' is not a bool"):
        parse_spec("distilled:78500B:dm:jpeg:core=0.1:complement=yes:recompress=prefix")
    with pytest.raises(ValueError, match="unknown distillation method 'dn'"):
        parse_spec("distilled:100:dn")
    with pytest.raises(ValueError, match="budget 'lots'"):
        parse_spec("replay:lots")
    # dm-multi forwards **options to dm: dm's own options are valid for it, typed as dm declares them
    spec = parse_spec("distilled:78500B:dm-multi:uint8:bits=2:match_variance=0:lr=2")
    assert spec.method_options == {"bits": 2, "match_variance": False, "lr": 2.0}


def test_identity_tells_apart_what_the_label_does_not():
    a = parse_spec("distilled:78500B:dm:uint8:iterations=100")
    b = parse_spec("distilled:78500B:dm:uint8:iterations=300")
    assert a.label == b.label  # the human label stays short (and stable for published tables)
    assert a.identity != b.identity
    assert parse_spec("jpeg:78500B:quality=2").identity != parse_spec("jpeg:78500B:quality=2:augment=1").identity
    assert a.identity == parse_spec("distilled:78500B:dm:uint8:iterations=100").identity
    assert StrategySpec.from_json(json.loads(b.identity)) == b
    with pytest.raises(ValueError, match="unknown StrategySpec fields"):
        StrategySpec.from_json({"kind": "naive", "colour": 1})


def test_benchmark_resume_and_tables_keep_specs_apart_by_identity():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import class_incremental as ci

    a = parse_spec("distilled:78500B:dm:uint8:iterations=100")
    b = parse_spec("distilled:78500B:dm:uint8:iterations=300")

    def record(spec, acc):
        return {"dataset": "mnist", "epochs": 1, "seed": 0, "label": spec.label, "kind": spec.kind, "mem_size": spec.mem_size,
                "method": spec.method, "method_options": spec.method_options, "storage": spec.storage, "recompress": spec.recompress,
                "options": spec.options, "final_accuracy": acc, "forgetting": None, "distill_seconds": [], "total_seconds": 1.0,
                "memory_images": 1, "memory_bytes": 1}

    old = record(a, 0.5)  # a record written before identities were stored: rebuilt from its fields
    new = {**record(b, 0.9), "identity": b.identity}
    assert ci._record_identity(old) == a.identity and ci._record_identity(new) == b.identity
    table = ci._table([old, new], {"width": 32, "batch_size": 128, "batch_size_mem": 128})
    assert "uint8 iterations=100 | 1 | 50.00" in table and "uint8 iterations=300 | 1 | 90.00" in table
