import pytest
import torch

from replaykit.data import load_tensors
from replaykit.networks import ConvNet, MLP
from replaykit.training import accuracy, predict_logits, seeded, train_classifier


@pytest.fixture(scope="module")
def digits():
    return load_tensors("digits"), load_tensors("digits", train=False)


def test_training_learns_digits_far_above_chance(digits):
    (x, y), (xt, yt) = digits
    with seeded(0):
        net = MLP(x.shape[1:], 10, hidden=64)
    before = accuracy(net, xt, yt)
    train_classifier(net, x, y, epochs=5, batch_size=64, lr=0.05)
    after = accuracy(net, xt, yt)
    assert after > 0.85 and after > before + 0.5


def test_same_seed_same_weights(digits):
    (x, y), _ = digits

    def run(seed):
        with seeded(123):
            net = ConvNet(x.shape[1:], 10, width=8)
        train_classifier(net, x[:200], y[:200], epochs=2, batch_size=32, seed=seed, augment=lambda b: b + 0.01 * torch.randn_like(b))
        return torch.cat([p.flatten() for p in net.parameters()])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_seeded_restores_the_callers_rng():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with seeded(99):
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected)


def test_soft_targets_train_like_hard_ones(digits):
    (x, y), (xt, yt) = digits
    soft = torch.nn.functional.one_hot(y, 10).float() * 0.9 + 0.01
    with seeded(0):
        net = MLP(x.shape[1:], 10, hidden=64)
    train_classifier(net, x, soft, epochs=5, batch_size=64, lr=0.05)
    assert accuracy(net, xt, yt) > 0.85


def test_lr_milestones_decay_the_learning_rate(digits):
    (x, y), _ = digits
    seen = []

    with seeded(0):
        net = MLP(x.shape[1:], 10, hidden=16)
    orig_step = torch.optim.SGD.step

    def spy_step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return orig_step(self, *a, **k)

    torch.optim.SGD.step = spy_step
    try:
        train_classifier(net, x[:64], y[:64], epochs=4, batch_size=64, lr=0.1, lr_milestones=[2])
    finally:
        torch.optim.SGD.step = orig_step
    assert seen == pytest.approx([0.1, 0.1, 0.01, 0.01])


def test_bad_training_input_is_refused():
    net = MLP((1, 8, 8), 10)
    with pytest.raises(ValueError, match="3 images but 2 targets"):
        train_classifier(net, torch.zeros(3, 1, 8, 8), torch.zeros(2, dtype=torch.int64), epochs=1)
    with pytest.raises(ValueError, match="empty"):
        train_classifier(net, torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64), epochs=1)
    with pytest.raises(ValueError, match="empty"):
        accuracy(net, torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64))


def test_predict_logits_batches_consistently():
    with seeded(0):
        net = ConvNet((1, 8, 8), 10, width=4)
    x = torch.randn(10, 1, 8, 8)
    assert torch.allclose(predict_logits(net, x, batch_size=3), predict_logits(net, x, batch_size=100), atol=1e-6)
