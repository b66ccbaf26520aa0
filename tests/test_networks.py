import pytest
import torch

from replaykit.networks import ConvNet, LeNet5, MLP, make_network

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 17, 23)]


@pytest.mark.parametrize("name", ["convnet", "mlp", "lenet"])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_network_maps_any_input_to_logits(name, shape):
    net = make_network(name, shape, 7)
    x = torch.randn(3, *shape)
    logits = net(x)
    assert logits.shape == (3, 7)
    assert net.embed(x).shape == (3, net.embedding_dim)
    assert torch.allclose(net.classifier(net.embed(x)), logits, atol=1e-6)
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_convnet_structure_follows_the_literature():
    net = ConvNet((1, 28, 28), 10, width=128, depth=3, norm="instance")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert [c.out_channels for c in convs] == [128, 128, 128]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert all(n.num_groups == n.num_channels == 128 for n in norms)  # instance norm
    assert net.embedding_dim == 128 * 3 * 3  # 28 -> 14 -> 7 -> 3
    maps = net.feature_maps(torch.randn(2, 1, 28, 28))
    assert [tuple(m.shape[1:]) for m in maps] == [(128, 14, 14), (128, 7, 7), (128, 3, 3)]


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_convnet_width_depth_norm_configurable(norm):
    net = ConvNet((3, 32, 32), 10, width=16, depth=4, norm=norm)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert net.embedding_dim == 16 * 2 * 2


def test_instance_norm_makes_output_independent_of_batch_mates():
    torch.manual_seed(0)
    net = ConvNet((1, 28, 28), 10, width=8).eval()
    a = torch.randn(1, 1, 28, 28)
    alone = net(a)
    together = net(torch.cat([a, torch.randn(4, 1, 28, 28) * 5]))[:1]
    assert torch.allclose(alone, together, atol=1e-5)


def test_mlp_and_lenet_sizes():
    assert MLP((1, 28, 28), 10).embedding_dim == 128
    assert LeNet5((1, 28, 28), 10).embedding_dim == 84
    assert sum(p.numel() for p in MLP((1, 28, 28), 10, hidden=128).parameters()) == 784 * 128 + 128 + 128 * 128 + 128 + 1290


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: make_network("resnet", (1, 28, 28), 10), "unknown network"),
        (lambda: ConvNet((28, 28), 10), "in_shape"),
        (lambda: ConvNet((1, 28, 28), 10, norm="layer"), "unknown norm"),
        (lambda: ConvNet((1, 28, 28), 10, depth=0), "depth"),
    ],
)
def test_bad_network_configuration_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
