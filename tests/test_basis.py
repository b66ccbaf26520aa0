"""``LinearBasisCodec``: a shared linear basis as a buffer codec, every byte counted, bad input refused."""

from __future__ import annotations

import pytest
import torch

from replaykit.basis import LinearBasisCodec
from replaykit.data import dataset_info, load_tensors


@pytest.fixture(scope="module")
def pixels():
    x, _ = load_tensors("digits")
    meta = dataset_info("digits").meta()
    return (x * meta["std"][0] + meta["mean"][0]).clamp(0, 1).flatten(1)  # [N, 64] in [0, 1]


def test_codes_are_small_bytes_and_decode_close_to_the_images(pixels):
    codec = LinearBasisCodec(components=16, bits=8).fit(pixels)
    codes = codec.encode(pixels[:50])
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (50, 16) and codec.code_bytes == 16
    decoded = codec.decode(codes)
    assert decoded.shape == (50, 64) and decoded.min() >= 0 and decoded.max() <= 1
    error = (decoded - pixels[:50]).pow(2).mean()
    assert error < 0.25 * pixels[:50].var()  # 16 of 64 components keep most of the variance
    # More components, less error; fewer bits per coefficient, more error (measured behaviour).
    few = LinearBasisCodec(components=4, bits=8).fit(pixels)
    assert (few.roundtrip(pixels[:50]) - pixels[:50]).pow(2).mean() > error
    coarse = LinearBasisCodec(components=16, bits=2).fit(pixels)
    assert coarse.code_bytes == 4
    assert (coarse.roundtrip(pixels[:50]) - pixels[:50]).pow(2).mean() > error


def test_the_shared_state_is_counted(pixels):
    codec = LinearBasisCodec(components=16, bits=4).fit(pixels)
    # uint8 mean (64) + int8 components (16 x 64) + float16 scale per component + two float16 range ends each
    assert codec.state_bytes(64) == 64 + 16 * 64 + 2 * 16 + 4 * 16
    assert codec.mean.dtype == torch.uint8 and codec.basis.dtype == torch.int8
    assert codec.scales.dtype == torch.float16 and codec.ranges.dtype == torch.float16


def test_synthesis_is_differentiable_in_the_coefficients(pixels):
    codec = LinearBasisCodec(components=8, bits=4).fit(pixels)
    coefficients = codec.project(pixels[:4]).requires_grad_(True)
    codec.synthesize(coefficients).sum().backward()
    assert coefficients.grad is not None and coefficients.grad.abs().sum() > 0


def test_bad_input_is_refused(pixels):
    with pytest.raises(ValueError, match="components"):
        LinearBasisCodec(components=0)
    with pytest.raises(ValueError, match="bits"):
        LinearBasisCodec(bits=3)
    with pytest.raises(RuntimeError, match="no basis yet"):
        LinearBasisCodec().encode(pixels[:2])
    with pytest.raises(ValueError, match="NaN or inf"):
        LinearBasisCodec().fit(torch.full((4, 64), float("nan")))
    with pytest.raises(ValueError, match="at least 2 images"):
        LinearBasisCodec().fit(pixels[:1])
    codec = LinearBasisCodec(components=8, bits=4).fit(pixels)
    with pytest.raises(ValueError, match=r"codes must be uint8 \[N, 4\]"):
        codec.decode(torch.zeros(3, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="floating point"):
        codec.encode(torch.zeros(2, 64, dtype=torch.uint8))
