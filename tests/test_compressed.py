"""Compressed raw replay: real exemplars held downsampled or JPEG-encoded within a budget in bytes."""

from __future__ import annotations

import pytest
import torch

from replaykit.compressed import CompressedReplayBuffer
from replaykit.data import dataset_info, load_tensors

DIGITS = dataset_info("digits").meta()


@pytest.fixture(scope="module")
def digits():
    return load_tensors("digits")


def _classes(images, labels, classes):
    mask = torch.isin(labels, torch.tensor(classes))
    return images[mask], labels[mask]


def test_downsample_fills_the_byte_budget_with_four_times_the_images(digits):
    policy = CompressedReplayBuffer(1300, DIGITS, codec="downsample", factor=2)
    policy.update_from_tensors(*_classes(*digits, [0, 1]))
    # 8x8 digits at 4x4 uint8: 16 pixel bytes + 1 label byte each; 650 bytes per class -> 38 each
    assert len(policy) == 2 * (650 // 17) and policy.nbytes() <= 1300
    images = policy.buffer[0][0]
    assert tuple(images.shape) == (1, 8, 8)  # replayed at the network's resolution
    raw = 1300 // 65  # raw uint8 replay holds 20 images in the same bytes
    assert len(policy) > 3 * raw


def test_shares_shrink_as_classes_arrive_and_every_class_is_kept(digits):
    policy = CompressedReplayBuffer(1300, DIGITS, codec="downsample", factor=2, seed=3)
    policy.update_from_tensors(*_classes(*digits, [0, 1]))
    first = [c.clone() for c in policy._held[0]]
    policy.update_from_tensors(*_classes(*digits, [2, 3, 4, 5]))
    assert sorted(policy._held) == [0, 1, 2, 3, 4, 5]
    assert all(len(v) == (1300 // 6) // 17 for v in policy._held.values())
    assert all(torch.equal(a, b) for a, b in zip(policy._held[0], first))  # kept the first-drawn exemplars
    assert policy.nbytes() <= 1300
    labels = [int(policy.buffer[i][1]) for i in range(len(policy.buffer))]
    assert sorted(set(labels)) == [0, 1, 2, 3, 4, 5]


def test_jpeg_counts_every_encoded_byte_and_decodes_close_to_the_original(digits):
    images, labels = digits
    big = torch.nn.functional.interpolate(images[:40], scale_factor=4, mode="nearest")  # 32x32, where a JPEG is worth it
    policy = CompressedReplayBuffer(100_000, DIGITS, codec="jpeg", quality=90)
    policy.update_from_tensors(big, labels[:40])
    codes = [c for v in policy._held.values() for c in v]
    header = policy._header
    assert header[:2].tolist() == [0xFF, 0xD8] and 200 < header.numel() < 1000  # a real JPEG header, held once
    assert len(codes) == 40 and policy.nbytes() == header.numel() + sum(c.numel() for c in codes) + len(codes) <= 100_000
    decoded = policy._decode(policy._encode(big))
    assert decoded.shape == big.shape
    assert ((decoded - big) * DIGITS["std"][0]).abs().mean() < 0.05  # in [0, 1] pixel units
    small = CompressedReplayBuffer(5_000, DIGITS, codec="jpeg", quality=90)
    small.update_from_tensors(big, labels[:40])
    assert 0 < len(small) < 40 and small.nbytes() <= 5_000


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="mem_bytes"):
        CompressedReplayBuffer(0, DIGITS)
    with pytest.raises(ValueError, match="codec"):
        CompressedReplayBuffer(100, DIGITS, codec="png")
    with pytest.raises(ValueError, match="mean and std"):
        CompressedReplayBuffer(100, {"dataset": "digits"})
    with pytest.raises(ValueError, match="quality"):
        CompressedReplayBuffer(100, DIGITS, codec="jpeg", quality=0)


def test_augment_replays_transformed_copies_of_the_held_images(digits):
    plain = CompressedReplayBuffer(1300, DIGITS, codec="jpeg", quality=50, seed=1)
    augmented = CompressedReplayBuffer(1300, DIGITS, codec="jpeg", quality=50, seed=1, augment=True)
    for policy in (plain, augmented):
        policy.update_from_tensors(*_classes(*digits, [0, 1]))
    assert len(plain.buffer) == len(augmented.buffer) and plain.nbytes() == augmented.nbytes()  # same bytes held
    changed = sum(not torch.equal(plain.buffer[i][0], augmented.buffer[i][0]) for i in range(len(plain.buffer)))
    assert changed >= len(plain.buffer) // 2
    assert [int(plain.buffer[i][1]) for i in range(5)] == [int(augmented.buffer[i][1]) for i in range(5)]


def test_view_gives_images_back_as_the_codec_holds_them(digits):
    from replaykit import jpeg
    from replaykit.avalanche import low_resolution_view

    x, y = _classes(*digits, [0, 1])
    held = CompressedReplayBuffer(1300, DIGITS, codec="jpeg", quality=20)
    held.update_from_tensors(x, y)
    codes = held._encode(x[:5])
    assert torch.allclose(held.view(x[:5]), held._decode(codes), atol=1e-6)  # what the buffer would replay for them
    assert not torch.allclose(held.view(x[:5]), x[:5], atol=0.05)
    assert torch.equal(CompressedReplayBuffer(1300, DIGITS, factor=2).view(x[:5]), low_resolution_view(x[:5], 2))
    assert CompressedReplayBuffer(1300, DIGITS, factor=1, bits=2).view(x[:5]) is None
