"""A learned linear basis as a replay-buffer codec: every image is a few quantised coefficients.

What decides a replay buffer at a fixed number of bytes is how many useful images it holds
(MRDC's point). Images of one dataset live near a low-dimensional subspace, so a basis shared by
all images of the buffer (its principal components, fitted on the data) lets each image be stored
as ``k`` coefficients of ``bits`` bits: 78,500 B hold ~7,000 MNIST images at ``k=16, bits=4``
where JPEG at quality 10 holds ~1,060. The basis itself is held too, and counted: the mean image
as uint8, the components as int8 with one float16 scale each, and each coefficient's quantiser
range as two float16 numbers.

:class:`LinearBasisCodec` works on flattened pixels in ``[0, 1]``; ``decode`` is linear (and so
differentiable in the coefficients), which lets a distiller learn the coefficients themselves.
"""

from __future__ import annotations

import math

import torch

from .buffer import pack_levels, unpack_levels

__all__ = ["LinearBasisCodec"]


class LinearBasisCodec:
    """Principal-component codec: ``pixels ≈ mean + coefficients @ components``.

    Args:
        components: ``k``, basis vectors kept.
        bits: bits per stored coefficient (1-8), packed ``8 // bits`` to a byte when that divides 8.
        clip: share of the fitted coefficients left outside each quantiser range (robust ranges).
    """

    def __init__(self, components: int = 16, bits: int = 4, clip: float = 0.005) -> None:
        if not isinstance(components, int) or isinstance(components, bool) or components < 1:
            raise ValueError(f"components must be a positive int, got {components!r}")
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"bits must be one of 1, 2, 4, 8, got {bits!r}")
        if not 0.0 <= clip < 0.5:
            raise ValueError(f"clip must lie in [0, 0.5), got {clip!r}")
        self.components, self.bits, self.clip = components, bits, float(clip)
        self.mean: torch.Tensor | None = None  # [D] uint8
        self.basis: torch.Tensor | None = None  # [k, D] int8
        self.scales: torch.Tensor | None = None  # [k] float16
        self.ranges: torch.Tensor | None = None  # [k, 2] float16: low / high of each coefficient

    @property
    def fitted(self) -> bool:
        return self.basis is not None

    # ----------------------------------------------------------------- fit
    def fit(self, pixels: torch.Tensor) -> "LinearBasisCodec":
        """Fit mean, components and coefficient ranges on ``[N, D]`` pixels in ``[0, 1]``."""
        flat = _check_pixels(pixels)
        if flat.shape[0] < 2:
            raise ValueError(f"fitting a basis needs at least 2 images, got {flat.shape[0]}")
        k = min(self.components, flat.shape[1])
        mean = (flat.mean(0) * 255).round().clamp(0, 255).to(torch.uint8)
        centred = flat.double() - mean.double() / 255
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        basis = vh[:k]
        if basis.shape[0] < k:  # fewer images than components: pad with zero rows so shapes stay fixed
            basis = torch.cat([basis, basis.new_zeros(k - basis.shape[0], basis.shape[1])])
        scales = (basis.abs().amax(1) / 127).clamp_min(1e-8).to(torch.float16)
        self.mean = mean
        self.basis = (basis / scales.double()[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.scales = scales
        coefficients = self.project(flat)
        low = torch.quantile(coefficients, self.clip, dim=0) if self.clip > 0 else coefficients.amin(0)
        high = torch.quantile(coefficients, 1 - self.clip, dim=0) if self.clip > 0 else coefficients.amax(0)
        self.ranges = torch.stack([low, torch.maximum(high, low + 1e-3)], 1).to(torch.float16)
        return self

    # ---------------------------------------------------------- transforms
    def dequantized_basis(self) -> torch.Tensor:
        """``[k, D]`` float32 components as held (int8 times their float16 scales)."""
        self._check_fitted()
        return self.basis.float() * self.scales.float()[:, None]

    def project(self, pixels: torch.Tensor) -> torch.Tensor:
        """Least-squares coefficients ``[N, k]`` of ``[N, D]`` pixels against the held basis."""
        flat = _check_pixels(pixels)
        basis = self.dequantized_basis().double()
        gram = basis @ basis.T + 1e-9 * torch.eye(basis.shape[0], dtype=torch.float64)
        rhs = (flat.double() - self.mean.double() / 255) @ basis.T
        return torch.linalg.solve(gram, rhs.T).T.float()

    def synthesize(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Pixels ``[N, D]`` from float coefficients ``[N, k]``; linear, so gradients reach the coefficients."""
        return self.mean.float() / 255 + coefficients @ self.dequantized_basis()

    def quantize(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Float coefficients ``[N, k]`` -> integer levels ``[N, k]`` in ``[0, 2**bits)`` (clipped to the ranges)."""
        self._check_fitted()
        low, high = self.ranges.float().unbind(1)
        top = 2 ** self.bits - 1
        return ((coefficients - low) / (high - low) * top).round().clamp(0, top).to(torch.uint8)

    def dequantize(self, levels: torch.Tensor) -> torch.Tensor:
        """Integer levels ``[N, k]`` -> the coefficients they stand for."""
        self._check_fitted()
        low, high = self.ranges.float().unbind(1)
        return low + levels.float() / (2 ** self.bits - 1) * (high - low)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` pixels in ``[0, 1]`` -> ``[N, code_bytes]`` uint8 codes."""
        return pack_levels(self.quantize(self.project(pixels)), self.bits)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``[N, code_bytes]`` uint8 codes -> ``[N, D]`` pixels clamped to ``[0, 1]``."""
        if codes.dtype != torch.uint8 or codes.ndim != 2 or codes.shape[1] != self.code_bytes:
            raise ValueError(f"codes must be uint8 [N, {self.code_bytes}], got {codes.dtype} {tuple(codes.shape)}")
        levels = unpack_levels(codes, self.bits, self.components)
        return self.synthesize(self.dequantize(levels)).clamp(0, 1)

    def roundtrip(self, pixels: torch.Tensor) -> torch.Tensor:
        """What the buffer would give back for ``pixels``: encoded, then decoded."""
        return self.decode(self.encode(pixels))

    # ---------------------------------------------------------------- bytes
    @property
    def code_bytes(self) -> int:
        """Bytes of one image's coefficients."""
        return math.ceil(self.components * self.bits / 8)

    def state_bytes(self, pixels_per_image: int) -> int:
        """Bytes of the shared state: uint8 mean, int8 components, float16 scales and ranges."""
        return pixels_per_image + self.components * pixels_per_image + 2 * self.components + 4 * self.components

    def _check_fitted(self) -> None:
        if self.basis is None:
            raise RuntimeError("the codec has no basis yet: call fit() first")


def _check_pixels(pixels: torch.Tensor) -> torch.Tensor:
    if not torch.is_floating_point(pixels):
        raise ValueError(f"pixels must be floating point in [0, 1], got {pixels.dtype}")
    flat = pixels.reshape(pixels.shape[0], -1).float()
    if not torch.isfinite(flat).all():
        raise ValueError("pixels hold NaN or inf")
    return flat
