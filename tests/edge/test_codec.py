"""Parameter storage (float16 / per-channel int8) and the low-resolution image decoder, against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge.codec import (
    SCALE_PREFIX, CodecError, decode_parameters, decoder_factor, dequantize_int8, encode_parameters, quantize_int8,
    upsample_bilinear,
)


def test_int8_is_symmetric_per_output_channel_within_half_a_step():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * np.array([1e-3, 0.1, 1, 10, 0, 3], np.float32)[:, None, None, None]
    q, scale = quantize_int8(weight)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (6,)
    assert q.min() >= -127 and q.max() <= 127
    np.testing.assert_allclose(scale, np.abs(weight).reshape(6, -1).max(1) / 127, rtol=1e-6)
    error = np.abs(dequantize_int8(q, scale) - weight).reshape(6, -1).max(1)
    assert (error <= scale / 2 * (1 + 1e-5)).all(), (error, scale)
    assert (np.abs(q).reshape(6, -1).max(1)[[0, 1, 2, 3, 5]] == 127).all()  # each channel uses the full range
    assert scale[4] == 0 and (dequantize_int8(q, scale)[4] == 0).all()  # a zero channel stays exactly zero
    with pytest.raises(ValueError, match=">= 2 dims"):
        quantize_int8(np.ones(4, np.float32))


def test_encode_decode_round_trip_per_storage():
    rng = np.random.default_rng(1)
    params = {"conv.weight": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
              "conv.bias": rng.standard_normal(4).astype(np.float32),
              "fc.weight": rng.standard_normal((3, 8)).astype(np.float32)}
    shapes = {n: list(v.shape) for n, v in params.items()}
    for weights, tolerance in (("float32", 0.0), ("float16", 2e-3), ("int8", 0.02)):
        tensors, storage = encode_parameters(params, weights, "param.")
        if weights == "int8":
            assert storage == {"conv.weight": "int8", "conv.bias": "float32", "fc.weight": "int8"}
            assert set(tensors) == {"param.conv.weight", "param.conv.bias", "param.fc.weight",
                                    SCALE_PREFIX + "param.conv.weight", SCALE_PREFIX + "param.fc.weight"}
        decoded = decode_parameters(tensors, shapes, storage, "param.", "test")
        for name, value in params.items():
            assert decoded[name].dtype == np.float32
            assert np.abs(decoded[name] - value).max() <= tolerance * np.abs(value).max(), (weights, name)
        assert (decoded["conv.bias"] == params["conv.bias"]).all() or weights == "float16"


def test_decode_refuses_what_the_manifest_does_not_describe():
    params = {"w": np.ones((2, 3), np.float32)}
    tensors, storage = encode_parameters(params, "int8", "p.")
    shapes = {"w": [2, 3]}
    with pytest.raises(CodecError, match="stored as int8.*manifest says float32"):
        decode_parameters(tensors, shapes, {"w": "float32"}, "p.", "b")
    with pytest.raises(CodecError, match="storage 'int4'"):
        decode_parameters(tensors, shapes, {"w": "int4"}, "p.", "b")
    with pytest.raises(CodecError, match="lacks its float32 scales"):
        decode_parameters({"p.w": tensors["p.w"]}, shapes, storage, "p.", "b")
    bad = dict(tensors, **{"p.w": np.full((2, 3), -128, np.int8)})
    with pytest.raises(CodecError, match="-128"):
        decode_parameters(bad, shapes, storage, "p.", "b")
    with pytest.raises(CodecError, match="not in the buffer file"):
        decode_parameters({}, shapes, storage, "p.", "b")


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_numpy_upsampling_matches_torch_bilinear(factor):
    """The device's decoder against torch.nn.functional.interpolate on normalised-MNIST-range images."""
    rng = np.random.default_rng(factor)
    pixels = rng.random((6, 3, 7, 9), dtype=np.float32)
    images = ((pixels - 0.1307) / 0.3081).astype(np.float32)  # [-0.42, 2.82], as MNIST after normalisation
    expected = torch.nn.functional.interpolate(torch.from_numpy(images), scale_factor=factor, mode="bilinear",
                                               align_corners=False).numpy()
    got = upsample_bilinear(images, factor)
    assert got.shape == (6, 3, 7 * factor, 9 * factor) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-6


def test_decoder_entries_are_validated():
    assert decoder_factor(None) == 1
    assert decoder_factor({"kind": "upsample", "factor": 3, "mode": "bilinear"}) == 3
    for bad in ({"kind": "upsample", "factor": 2, "mode": "nearest"}, {"kind": "jpeg"}, "upsample",
                {"kind": "upsample", "factor": 0, "mode": "bilinear"}, {"kind": "upsample", "factor": 2.0, "mode": "bilinear"},
                {"kind": "upsample", "factor": True, "mode": "bilinear"}):
        with pytest.raises(CodecError):
            decoder_factor(bad)
    with pytest.raises(CodecError, match="decoder factor must be a positive int, got 0"):
        decoder_factor({"kind": "upsample", "factor": 0, "mode": "bilinear"})
    with pytest.raises(ValueError, match="N, C, H, W"):
        upsample_bilinear(np.zeros((3, 4, 4), np.float32), 2)


# ----------------------------------------------------------------- replay images as the host holds them
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_unpacking_inverts_the_hosts_packing(bits):
    from edge.codec import unpack_levels
    from replaykit.buffer import pack_levels

    levels = torch.randint(0, 2 ** bits, (5, 1, 7, 7), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_levels(levels, bits).numpy()
    assert packed.shape[1] == -(-49 * bits // 8)
    assert np.array_equal(unpack_levels(packed, bits, 49).reshape(5, 1, 7, 7), levels.numpy())


@pytest.mark.parametrize("storage,bits", [("uint8", 8), ("uint8", 2), ("float16", 8), ("float32", 8), ("jpeg", 8)])
def test_device_decodes_every_storage_to_the_hosts_values(storage, bits):
    """The device's numpy (+ Pillow) decoder gives the very values the host replays from the same codes."""
    from edge.codec import decode_stored_images
    from replaykit import jpeg
    from replaykit.buffer import SyntheticBuffer

    gen = torch.Generator().manual_seed(7)
    meta = {"mean": [0.13], "std": [0.31], "jpeg_quality": 10, "pixel_bits": bits}
    buffer = SyntheticBuffer(torch.randn(12, 1, 8, 8, generator=gen), torch.arange(12) % 4, 4, meta=meta)
    held = buffer.quantized(storage)  # what the host replays
    stored = held._stored_images(storage).numpy()  # what it saves and counts
    head = jpeg.header_length(stored) if storage == "jpeg" else 0
    mean, std = np.float32([[[[0.13]]]]), np.float32([[[[0.31]]]])
    device = decode_stored_images(stored, storage, (1, 8, 8), 12, mean=mean, std=std, pixel_bits=bits, jpeg_header_bytes=head)
    assert device.dtype == np.float32 and np.array_equal(device, held.images.numpy())
    with pytest.raises(CodecError):
        decode_stored_images(stored, storage, (1, 8, 8), 11, mean=mean, std=std, pixel_bits=bits, jpeg_header_bytes=head)


def test_codec_view_is_the_hosts_view():
    """Mixed-view training on the device shows images as the host's DistilledBuffer.view does: average-pooled,
    through JPEG at the buffer's quality, upsampled."""
    from edge.codec import avg_pool, has_view, view_images
    from replaykit import jpeg
    from replaykit.buffer import decode_upsample

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 8, 8, generator=gen)
    mean, std = torch.tensor(0.13).view(1, 1, 1, 1), torch.tensor(0.31).view(1, 1, 1, 1)
    assert np.allclose(avg_pool(x.numpy(), 2), torch.nn.functional.avg_pool2d(x, 2).numpy(), atol=1e-6)
    host = jpeg.roundtrip(x, 5, mean, std).numpy()
    device = view_images(x.numpy(), "jpeg", 1, mean.numpy(), std.numpy(), 5)
    assert np.array_equal(device, host)
    host_small = decode_upsample(torch.nn.functional.avg_pool2d(x, 2), 2).numpy()
    assert np.allclose(view_images(x.numpy(), "uint8", 2, mean.numpy(), std.numpy()), host_small, atol=1e-5)
    assert has_view("jpeg", 1) and has_view("uint8", 2) and not has_view("uint8", 1)
