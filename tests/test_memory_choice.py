"""The plugin's choice of distill / hybrid / select comes from the documented table and is recorded."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from replaykit import distill
from replaykit.avalanche import DistilledBuffer
from replaykit.data import dataset_info, load_tensors
from replaykit.memory_choice import CHOICES, choose_memory


def test_table_is_ordered_unbounded_at_the_end_and_names_its_evidence():
    for kind in (1, 3):
        bounds = [bound for channels, bound, _, _ in CHOICES if channels == kind]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf")
        assert [e for channels, _, e, _ in CHOICES if channels == kind][-1] == float("inf")  # any epochs end in a row
    for _, _, _, choice in CHOICES:
        assert choice.mode in ("distill", "hybrid", "select") and choice.method in distill.available()
        assert (choice.core is not None) == (choice.mode != "select") and choice.evidence
        assert choice.mode != "hybrid" or 0 < choice.core < 1


def test_each_budget_gets_the_first_row_that_holds_it(caplog):
    shapes = {1: (1, 28, 28), 3: (3, 32, 32)}
    with caplog.at_level(logging.INFO, logger="replaykit"):
        for channels, bound, most_epochs, choice in CHOICES:
            shape = shapes[channels]
            raw = shape[0] * shape[1] * shape[2] + 1
            probe = bound * raw if bound != float("inf") else 1e9
            epochs = int(most_epochs) if most_epochs != float("inf") else 50
            assert choose_memory(probe, shape, epochs) == choice
    assert "bytes per class" in caplog.text and "raw images" in caplog.text
    # one budget, two image kinds: 3,073 B per class is 1 raw CIFAR-10 image but ~3.9 raw MNIST images
    assert choose_memory(3073, (3, 32, 32)).mode == "distill" and choose_memory(3073, (1, 28, 28)).mode == "select"
    with pytest.raises(ValueError, match="bytes_per_class"):
        choose_memory(0, (1, 28, 28))
    with pytest.raises(ValueError, match="in_shape"):
        choose_memory(100, (28, 28))
    # more epochs per experience change the grey choice at one raw image per class (validated at 5 epochs)
    assert choose_memory(785, (1, 28, 28)).mode == "distill" and choose_memory(785, (1, 28, 28), epochs=5).mode == "select"
    # and at ten raw images per class: herding's selection for 1 epoch, the hybrid for 5 (both validated)
    assert choose_memory(7_850, (1, 28, 28)).mode == "select"
    five = choose_memory(7_850, (1, 28, 28), epochs=5)
    assert (five.mode, five.method, five.core, five.storage, five.jpeg_quality) == ("hybrid", "dm", 0.1, "jpeg", 2)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="epochs"):
            choose_memory(785, (1, 28, 28), epochs=bad)


@pytest.mark.parametrize("mem_bytes", [650, 80_000])
def test_auto_buffer_holds_what_the_table_says_and_records_it(mem_bytes):
    x, y = load_tensors("digits")
    meta = dataset_info("digits").meta()
    buffer = DistilledBuffer(method="auto", mem_bytes=mem_bytes, num_classes=10, dataset_meta=meta, progress=False)
    choice = choose_memory(mem_bytes / 10, meta["in_shape"])
    assert (buffer.method, buffer.recompress, buffer.core, buffer.storage, buffer.logits) == (
        choice.method, choice.recompress, choice.core, choice.storage, choice.logits)
    if "iterations" in choice.method_options:
        cut = {**buffer.resolved.method_options, "iterations": 2}  # the table's setting, cut short for the test
        buffer.resolved = dataclasses.replace(buffer.resolved, method_options=cut)
    learner = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    buffer.update_from_tensors(x[y < 2], y[y < 2], learner=learner)
    assert buffer.synthetic.meta["memory_choice"] == choice.to_json() and buffer.nbytes() <= mem_bytes
    with pytest.raises(ValueError, match="mem_bytes and num_classes"):
        DistilledBuffer(10, method="auto", dataset_meta=meta)
    for chosen_by_auto in ({"method_options": {"iterations": 5}}, {"core": 0.5}, {"fill": "herding"}):
        with pytest.raises(ValueError, match="leave them unset"):
            DistilledBuffer(method="auto", mem_bytes=650, storage="uint8", num_classes=10, dataset_meta=meta, **chosen_by_auto)


def test_auto_on_colour_images_at_one_raw_image_distills_for_the_learner_in_process():
    meta = dataset_info("cifar10").meta()
    buffer = DistilledBuffer(method="auto", mem_bytes=30_730, num_classes=10, dataset_meta=meta, progress=False)
    choice = choose_memory(3_073, meta["in_shape"])
    assert choice.learner_aware and buffer.learner_aware and buffer.storage == "jpeg"
    assert buffer.method_options["real_batch"] == 256
    with pytest.raises(ValueError, match="method='auto'"):
        DistilledBuffer(method="auto", mem_bytes=30_730, num_classes=10, dataset_meta=meta, progress=False, workers=2)


def test_auto_chooses_for_the_strategys_epochs_and_refuses_a_strategy_that_trains_otherwise():
    from types import SimpleNamespace

    from replaykit.avalanche import DistilledReplayPlugin

    meta = dataset_info("mnist").meta()
    one = DistilledReplayPlugin(method="auto", mem_bytes=7_850, num_classes=10, dataset_meta=meta, progress=False)
    five = DistilledReplayPlugin(method="auto", mem_bytes=7_850, num_classes=10, dataset_meta=meta, progress=False, epochs=5)
    assert one.storage_policy.memory_choice["mode"] == "distill" and five.storage_policy.memory_choice["mode"] == "select"
    assert five.storage_policy.storage == "jpeg" and five.storage_policy.method == "herding"
    experience = SimpleNamespace(classes_in_this_experience=[0, 1], dataset=[(torch.zeros(1, 28, 28), 0, 0)])
    with pytest.raises(ValueError, match="epochs=1 per experience, but the strategy trains 5"):
        one.before_training_exp(SimpleNamespace(experience=experience, train_epochs=5))
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        DistilledReplayPlugin(method="auto", mem_bytes=7_850, num_classes=10, dataset_meta=meta, progress=False, epochs=0)
