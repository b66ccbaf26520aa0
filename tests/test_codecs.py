"""The codec layer: one interface for what a buffer stores, and the bytes it counts."""

from __future__ import annotations

import pytest
import torch

from replaykit import codecs
from replaykit.buffer import SyntheticBuffer

MEAN, STD = [0.1307], [0.3081]
META = {"dataset": "mnist", "mean": MEAN, "std": STD}


def _images(n: int = 6, size: int = 8, seed: int = 0) -> torch.Tensor:
    pixels = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return (pixels - MEAN[0]) / STD[0]


def _element_codecs() -> list[codecs.Codec]:
    return [codecs.make("float32"), codecs.make("float16"), *(codecs.make("uint8", bits=b, mean=MEAN, std=STD) for b in (1, 2, 4, 8)),
            codecs.make("jpeg", quality=30, mean=MEAN, std=STD)]


def test_registry_lists_every_codec_and_names_an_unknown_one():
    assert {"float32", "float16", "uint8", "jpeg", "downsample"} <= set(codecs.available())
    assert codecs.storages() == ("float32", "float16", "uint8", "jpeg")
    with pytest.raises(ValueError, match="unknown codec 'png'; available: .*jpeg"):
        codecs.make("png")
    with pytest.raises(ValueError, match="already registered"):
        codecs.register(type("Other", (codecs.REGISTRY["float32"],), {"name": "float32"}))


@pytest.mark.parametrize("codec", _element_codecs(), ids=repr)
def test_decode_of_the_packed_codes_is_the_roundtrip_and_nbytes_is_what_is_packed(codec):
    images = _images()
    codes = codec.encode(images)
    packed = codec.pack(codes)
    header = codec.header_nbytes(packed)
    assert header == codes.header.numel()
    again = codec.unpack(packed, len(images), images.shape[1:], header)
    decoded = codec.decode(again, images.shape[1:])
    assert decoded.dtype == torch.float32 and decoded.shape == images.shape
    assert torch.equal(decoded, codec.roundtrip(images))
    assert codec.nbytes(codes) == packed.numel() * packed.element_size()
    per_image = codec.image_nbytes(images.shape[1:])
    if per_image is not None:  # fixed size: the count needs no encoding
        assert codec.nbytes(codes) == len(images) * per_image


def test_grey_levels_keep_two_to_the_bits_levels_packed_to_bytes():
    images = _images(size=28)
    for bits in (1, 2, 4, 8):
        codec = codecs.make("uint8", bits=bits, mean=MEAN, std=STD)
        pixels = codec.roundtrip(images) * STD[0] + MEAN[0]
        assert len(torch.unique((pixels * (2 ** bits - 1)).round())) <= 2 ** bits
        assert codec.image_nbytes((1, 28, 28)) == -(-784 * bits // 8)
    with pytest.raises(codecs.BufferFormatError, match="pixel_bits must be one of"):
        codecs.make("uint8", bits=3)


def test_jpeg_holds_its_header_once():
    codec = codecs.make("jpeg", quality=50, mean=MEAN, std=STD)
    codes = codec.encode(_images(n=5))
    assert codes.header.numel() > 100 and len(codes.bodies) == 5
    assert codec.nbytes(codes) == codes.header.numel() + sum(b.numel() for b in codes.bodies)
    more = codec.encode(_images(n=2, seed=1), codes.header)  # a second batch reuses the header
    assert torch.equal(more.header, codes.header)
    assert torch.equal(codec.view(_images()), codec.roundtrip(_images()))
    with pytest.raises(ValueError, match="jpeg_quality must be an int"):
        codecs.make("jpeg", quality=0)


def test_downsample_composes_with_any_codec_and_says_how_it_decodes():
    inner = codecs.make("uint8", bits=2, mean=MEAN, std=STD)
    codec = codecs.make("downsample", factor=2, inner=inner)
    assert codec.image_nbytes((1, 28, 28)) == 49 and codec.storage == "uint8" and codec.element is inner
    assert codec.meta() == {"decoder": codecs.decoder_meta(2), "pixel_bits": 2}
    assert codecs.check_decoder(codec.meta()["decoder"]) == 2
    images = _images(size=28)
    decoded = codec.decode(codec.encode(images), images.shape[1:])
    assert decoded.shape == images.shape
    small = torch.nn.functional.avg_pool2d(images, 2)
    assert torch.equal(decoded, codecs.upsample(inner.roundtrip(small), 2))
    # the view imitates the resolution (and JPEG), not the grey levels
    assert torch.equal(codec.view(images), codecs.upsample(small, 2))
    assert codecs.compose(1, inner) is inner and inner.view(images) is None
    with pytest.raises(ValueError, match="does not divide the image size 28x28"):
        codecs.make("downsample", factor=3).image_nbytes((1, 28, 28))
    with pytest.raises(ValueError, match="needs a pixel codec"):
        codecs.make("downsample", factor=2, inner=codecs.make("float16"), space="pixels")


def test_pixel_space_downsampling_pools_clipped_pixels_before_rounding():
    inner = codecs.make("uint8", bits=8, mean=MEAN, std=STD)
    codec = codecs.compose(2, inner, space="pixels")
    images = _images(size=8)
    pixels = (images * STD[0] + MEAN[0]).clamp(0, 1)
    levels = (torch.nn.functional.avg_pool2d(pixels, 2) * 255).round().to(torch.uint8)
    assert torch.equal(codec.pack(codec.encode(images)), levels)
    expected = (codecs.upsample(levels.float() / 255, 2) - MEAN[0]) / STD[0]
    assert torch.equal(codec.decode(codec.encode(images), images.shape[1:]), expected)


@pytest.mark.parametrize("storage, meta", [("float32", {}), ("float16", {}), ("uint8", {}), ("uint8", {"pixel_bits": 2}),
                                           ("jpeg", {"jpeg_quality": 10})])
def test_a_buffer_counts_exactly_the_bytes_its_file_holds_for_the_images(storage, meta):
    buffer = SyntheticBuffer(_images(n=9), torch.arange(9) % 3, 3, None, dict(META, **meta))
    stored = buffer._stored_images(storage)
    assert buffer.nbytes(storage) == stored.numel() * stored.element_size() + buffer.label_nbytes()
    assert buffer.label_nbytes() == 9 * codecs.label_row_bytes()


def test_image_cost_counts_pixels_and_labels_in_one_place():
    assert codecs.image_cost_bytes((1, 28, 28)) == 785
    assert codecs.image_cost_bytes((1, 28, 28), factor=2, bits=2, logit_classes=10) == 49 + 1 + 12
    assert codecs.image_cost_bytes((3, 32, 32), storage="float16", soft_classes=10) == 3 * 32 * 32 * 2 + 1 + 20
    with pytest.raises(ValueError, match="no fixed size"):
        codecs.image_cost_bytes((1, 28, 28), storage="jpeg")
    with pytest.raises(ValueError, match="storage must be one of"):
        codecs.image_cost_bytes((1, 28, 28), storage="int4")


@pytest.mark.parametrize("storage, meta, factor", [("uint8", {"pixel_bits": 2}, 2), ("jpeg", {"jpeg_quality": 10}, 1), ("float16", {}, 2)])
def test_the_manifest_entries_say_what_the_edge_exporter_writes(storage, meta, factor):
    from edge.exporter import _replay_tensors

    images = torch.nn.functional.avg_pool2d(_images(n=5), factor) if factor > 1 else _images(n=5)
    decoder = {"decoder": codecs.decoder_meta(factor)} if factor > 1 else {}
    buffer = SyntheticBuffer(images, torch.arange(5) % 3, 3, None, dict(META, **meta, **decoder))
    codec = codecs.compose(buffer.decoder_factor, buffer.codec(storage))
    entry = codec.manifest(buffer._stored_images(storage))
    _, replay = _replay_tensors(buffer, storage, 3)
    assert {k: replay[k] for k in ("pixel_bits", "jpeg_header_bytes", "jpeg_quality")} == \
        {k: entry[k] for k in ("pixel_bits", "jpeg_header_bytes", "jpeg_quality")}
    assert entry["decoder"] == buffer.meta.get("decoder") and entry["image_storage"] == storage
