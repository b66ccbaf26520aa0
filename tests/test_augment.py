import pytest
import torch

from replaykit.augment import DSA, TRANSFORMS
from replaykit.networks import ConvNet
from replaykit.training import accuracy, train_classifier


@pytest.fixture(autouse=True)
def one_thread():
    # two OpenMP threads on a loaded 2-core machine are many times slower than one
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(n=6, c=1, h=16, w=16, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("op", TRANSFORMS)
def test_each_transform_keeps_shape_flows_gradients_and_changes_images(op):
    dsa = DSA(op, mode="all", seed=1)
    x = _images(c=3).requires_grad_(True)
    params = dsa.sample(x.shape[0])
    if op == "flip":  # make sure at least one image is flipped
        params.values["flip"][:] = 1.0
    y = dsa.apply(x, params)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not torch.allclose(y, x)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_siamese_same_params_same_transform_on_two_batches():
    dsa = DSA("crop_scale_rotate_cutout", mode="all", seed=3)
    real, syn = _images(8, seed=1), _images(3, seed=2)
    params = dsa.sample(1)  # one set shared by batches of different sizes
    both = dsa.apply(torch.cat([real, syn]), params)
    assert torch.allclose(dsa.apply(real, params), both[:8], atol=1e-6)
    assert torch.allclose(dsa.apply(syn, params), both[8:], atol=1e-6)
    # the shared transform is the same for every image: a repeated image stays identical
    twice = dsa.apply(torch.cat([syn[:1], syn[:1]]), params)
    assert torch.allclose(twice[0], twice[1])


def test_seed_determinism_and_fresh_draws():
    x = _images()
    a, b = DSA(seed=5), DSA(seed=5)
    first_a, first_b = a(x), b(x)
    assert torch.equal(first_a, first_b)
    assert torch.equal(a(x), b(x))
    draws = [DSA(seed=5, mode="all")(x) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    other = DSA(seed=6, mode="all")(x)
    assert not torch.allclose(draws[0], other)
    assert torch.equal(DSA(seed=5).reseed(9)(x), DSA(seed=9)(x))


def test_global_rng_mode_follows_torch_seed():
    x = _images()
    torch.manual_seed(0)
    first = DSA(seed=None, mode="all")(x)
    torch.manual_seed(0)
    assert torch.equal(first, DSA(seed=None, mode="all")(x))


def test_single_mode_applies_one_transform_from_strategy():
    dsa = DSA("crop_rotate", seed=0)
    seen = {dsa.sample(4).ops for _ in range(40)}
    assert seen == {("crop",), ("rotate",)}


def test_crop_is_a_whole_pixel_shift():
    dsa = DSA("crop", mode="all", seed=0)
    x = _images(1, h=16, w=16)
    params = dsa.sample(1)
    params.values["crop"][:] = torch.tensor([[0.0, 2 / 16]])  # 2 pixels along width
    y = dsa.apply(x, params)
    assert torch.allclose(y[..., :, :-2], x[..., :, 2:], atol=1e-5)
    assert y[..., :, -2:].abs().max() < 1e-5


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="unknown augmentation"):
        DSA("crop_blur")
    with pytest.raises(ValueError, match="mode"):
        DSA(mode="some")
    dsa = DSA(seed=0)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        dsa(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="sampled for 4 images"):
        dsa.apply(_images(3), dsa.sample(4))
    assert torch.equal(DSA("none")(_images()), _images())


def test_usable_as_train_classifier_augment():
    gen = torch.Generator().manual_seed(0)
    # two classes: a bright blob left or right; augmented training still learns them
    x = torch.zeros(32, 1, 12, 12)
    y = torch.arange(32) % 2
    x[y == 0, :, 4:8, 1:5] = 1
    x[y == 1, :, 4:8, 7:11] = 1
    x = x + 0.1 * torch.randn(x.shape, generator=gen)
    torch.manual_seed(0)
    net = ConvNet((1, 12, 12), 2, width=4, depth=2)
    train_classifier(net, x, y, epochs=10, batch_size=16, lr=0.05, augment=DSA("scale_rotate", seed=0))
    assert accuracy(net, x, y) > 0.9


def test_replay_augment_transforms_one_image_reproducibly():
    from replaykit.augment import ReplayAugment, dsa_strategy

    image = torch.randn(1, 8, 8)
    a, b = ReplayAugment("digits", seed=3), ReplayAugment("digits", seed=3)
    outs_a, outs_b = [a(image) for _ in range(6)], [b(image) for _ in range(6)]
    assert all(o.shape == image.shape for o in outs_a)
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))  # same seed, same stream
    assert sum(not torch.allclose(o, image) for o in outs_a) >= 4  # it does change images
    assert dsa_strategy("mnist") == "crop_scale_rotate_cutout" and "flip" in dsa_strategy("CIFAR-10")
    with pytest.raises(ValueError, match="one image"):
        a(torch.randn(2, 1, 8, 8))
