"""``replaykit.jpeg``: the JPEG model a distiller learns through agrees with torchvision's codec."""

from __future__ import annotations

import pytest
import torch

from replaykit import jpeg
from replaykit.data import dataset_info, load_tensors

ZIGZAG = [0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
          35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63]


@pytest.fixture(scope="module")
def pixels():
    x, _ = load_tensors("digits")
    meta = dataset_info("digits").meta()
    big = torch.nn.functional.interpolate(x[:64], size=(28, 28), mode="bilinear", align_corners=False)  # MNIST-sized
    return ((big * meta["std"][0] + meta["mean"][0]).clamp(0, 1) * 255).round() / 255


@pytest.mark.parametrize("quality", [2, 10, 50, 90])
def test_quantisation_table_is_the_one_torchvision_writes(pixels, quality):
    header, _ = jpeg.encode((pixels[:1] * 255).round().to(torch.uint8), quality)
    data = bytes(header.tolist())
    at = data.find(b"\xff\xdb")  # DQT segment: marker, length, table id, 64 steps in zigzag order
    natural = [0] * 64
    for k, step in enumerate(data[at + 5: at + 69]):
        natural[ZIGZAG[k]] = step
    assert torch.equal(jpeg.quant_table(quality), torch.tensor(natural, dtype=torch.float32).view(8, 8))


@pytest.mark.parametrize("quality", [5, 10, 50])
def test_simulation_gives_back_what_the_codec_gives_back(pixels, quality):
    header, bodies = jpeg.encode((pixels * 255).round().to(torch.uint8), quality)
    real = jpeg.decode(header, bodies, 1).float() / 255
    simulated = jpeg.simulate(pixels, quality)
    levels = (real - simulated).abs() * 255
    # libjpeg's integer DCT rounds a few coefficients the other way; everything else agrees to the grey level.
    assert levels.mean() < 0.5 and (levels > 1.5).float().mean() < 0.05
    assert (simulated - pixels).abs().mean() > 0  # it is lossy, as the codec is


def test_simulation_passes_gradients_straight_through(pixels):
    x = pixels[:4].clone().requires_grad_(True)
    jpeg.simulate(x, 10).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_simulation_and_table_refuse_what_they_do_not_model():
    with pytest.raises(ValueError, match="grey-level"):
        jpeg.simulate(torch.rand(2, 3, 8, 8), 10)
    with pytest.raises(ValueError, match="quality"):
        jpeg.quant_table(0)
