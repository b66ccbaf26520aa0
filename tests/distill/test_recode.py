"""``recode``: selected real images re-learned so that their decoded codes keep what a network sees."""

import pytest
import torch

from replaykit import codecs, distill
from replaykit.data import dataset_info, load_tensors
from replaykit.distill.features import RandomConvNets, embed


@pytest.fixture(scope="module")
def digits():
    return load_tensors("digits")


def test_recode_codes_look_more_like_their_originals_than_plain_jpeg(digits):
    """A network the method never saw finds the decoded recoded images closer to the originals they started from."""
    x, y = digits
    meta = dataset_info("digits").meta()
    codec = codecs.for_storage("jpeg", quality=10, mean=meta["mean"], std=meta["std"])
    options = dict(ipc=12, jpeg_quality=10, width=16, depth=2, seed=0, progress=False)
    learned = distill.make("recode", iterations=40, **options).distill(x, y, meta=meta)
    start = distill.make("recode", iterations=1, lr=1e-12, **options).distill(x, y, meta=meta)
    assert torch.equal(learned.class_ids, start.class_ids)
    originals = start.images  # one step at lr 1e-12: the selected real images themselves
    assert all(any(torch.allclose(o, r) for r in x[y == c]) for o, c in zip(originals[:5], start.class_ids[:5]))
    probe = RandomConvNets(x.shape[1:], width=16, depth=2).sample(987654321)

    def distance(images):
        decoded = codec.decode(codec.encode(images), images.shape[1:])
        return float(((embed(probe, decoded) - embed(probe, originals)) ** 2).sum(1).mean())

    assert distance(learned.images) < 0.9 * distance(originals)


def test_recode_from_random_starts_from_exactly_the_random_methods_picks(digits):
    """``init="random"`` re-learns what a buffer's random twin holds (same seed, same count, same order), and learns."""
    x, y = digits
    meta = dataset_info("digits").meta()
    twin = distill.make("random", ipc=7, seed=3, progress=False).distill(x, y, meta=meta)
    options = dict(ipc=7, jpeg_quality=10, width=16, depth=2, seed=3, progress=False, init="random")
    start = distill.make("recode", iterations=1, lr=1e-12, **options).distill(x, y, meta=meta)
    assert torch.equal(start.class_ids, twin.class_ids)
    assert torch.allclose(start.images, twin.images, atol=1e-6)
    learned = distill.make("recode", iterations=10, **options).distill(x, y, meta=meta)
    assert (learned.images - twin.images).abs().amax() > 1e-2
    herding = distill.make("recode", iterations=1, lr=1e-12, **dict(options, init="herding")).distill(x, y, meta=meta)
    assert not torch.allclose(herding.images, twin.images)  # the option changes the start


def test_recode_rejects_options_it_cannot_honour():
    with pytest.raises(ValueError, match="init"):
        distill.make("recode", init="noise")
    with pytest.raises(ValueError, match="batch_classes"):
        distill.make("recode", batch_classes=True)
    assert distill.make("recode", batch_classes=None).batch_classes is False  # auto: the per-class loop
    with pytest.raises(ValueError, match="pairs"):
        distill.make("recode", pairs=0)
