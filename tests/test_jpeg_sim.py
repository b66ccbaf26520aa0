"""The differentiable JPEG stays close to what Pillow decodes, and passes gradients to the pixels."""

import pytest
import torch
import torch.nn.functional as F

from replaykit import distill, jpeg
from replaykit.jpeg_sim import quant_tables, simulate_jpeg


def _smooth_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Natural-ish pixels in [0, 255]: low-resolution noise upsampled, plus a little fine noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, channels, size // 4, size // 4), generator=gen)
    fine = 0.1 * torch.rand((n, channels, size, size), generator=gen)
    return ((F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) * 0.9 + fine) * 255).round()


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("quality", [2, 10, 50])
def test_simulation_is_close_to_pillow(channels, size, quality):
    pixels = _smooth_images(40, channels, size)
    header, bodies = jpeg.encode(pixels.to(torch.uint8), quality)
    pillow = jpeg.decode(header, bodies, channels).float()
    sim = simulate_jpeg(pixels, quality)
    assert sim.shape == pixels.shape
    codec_error = (pixels - pillow).abs().mean()
    assert (sim - pillow).abs().mean() < 0.2 * codec_error, "the simulation must be far closer to Pillow than the input is"


def test_gradient_reaches_the_pixels():
    pixels = _smooth_images(4, 3, 32).requires_grad_(True)
    simulate_jpeg(pixels, 2).square().mean().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_quality_tables_follow_libjpeg():
    luma, chroma = quant_tables(50)
    assert luma[0, 0] == 16 and chroma[0, 0] == 17  # quality 50 is the base table
    assert int(quant_tables(2)[0].min()) == 250 and int(quant_tables(100)[0].max()) == 1
    with pytest.raises(ValueError, match="quality"):
        quant_tables(0)
    with pytest.raises(ValueError, match="1 or 3"):
        simulate_jpeg(torch.zeros(1, 2, 8, 8), 2)


def test_dm_learns_for_jpeg_and_refuses_two_stored_forms():
    from replaykit.data import dataset_info

    x, y = torch.randn(40, 3, 32, 32), torch.arange(2).repeat(20)
    buffer = distill.make("dm", ipc=2, iterations=3, jpeg_quality=2, progress=False).distill(x, y, num_classes=2, meta=dataset_info("cifar10").meta())
    assert buffer.meta["learned_for_jpeg_quality"] == 2
    with pytest.raises(ValueError, match="two stored forms"):
        distill.make("dm", ipc=2, bits=2, jpeg_quality=2)
    with pytest.raises(ValueError, match="mean and std"):
        distill.make("dm", ipc=2, iterations=1, jpeg_quality=2, progress=False).distill(x, y, num_classes=2)


def test_buffer_refuses_jpeg_learning_for_another_storage():
    from replaykit.avalanche import DistilledBuffer
    from replaykit.data import dataset_info

    meta = dataset_info("mnist").meta()
    with pytest.raises(ValueError, match="storage='jpeg' with jpeg_quality=2"):
        DistilledBuffer(mem_bytes=7850, method="dm", method_options={"jpeg_quality": 2}, storage="uint8", dataset_meta=meta, num_classes=10)
    with pytest.raises(ValueError, match="jpeg_quality=2"):
        DistilledBuffer(mem_bytes=7850, method="dm", method_options={"jpeg_quality": 2}, storage="jpeg", jpeg_quality=10, dataset_meta=meta,
                        num_classes=10)
