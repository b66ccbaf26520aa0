"""Differentiable siamese augmentation (DSA, Zhao & Bilen 2021).

Distillation learns images *through* augmentation, so every transform here is
differentiable with respect to the input pixels (affine warps via
``grid_sample``, cutout via a mask, colour jitter via arithmetic). *Siamese*
means the same sampled parameters can be applied to two batches, e.g. a real
batch and a synthetic batch, so that matching compares like with like:

>>> dsa = DSA("crop_scale_rotate_cutout", seed=0)
>>> params = dsa.sample(1)                    # one parameter set for the whole batch
>>> real_aug, syn_aug = dsa.apply(real, params), dsa.apply(syn, params)   # doctest: +SKIP

Called plainly, ``dsa(x)`` samples fresh per-image parameters and applies them,
so a :class:`DSA` also works as ``augment=`` in
:func:`replaykit.training.train_classifier`.

Parameters (from the DSA reference code): translation up to 1/8 of the side,
scale in [1/1.2, 1.2], rotation up to 15 degrees, one cutout square of half the
side, brightness +-0.5, saturation x[0, 2], contrast x[0.5, 1.5]. Flip is off
by default (digits are not mirror-symmetric).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["DSA", "DSAParams", "TRANSFORMS", "ReplayAugment", "dsa_strategy"]

#: Names usable in a strategy string, in the order they are applied in ``mode="all"``.
TRANSFORMS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass
class DSAParams:
    """Sampled parameters of one augmentation call.

    Each tensor has a leading dimension of 1 (shared by every image: siamese
    use with batches of different sizes) or of the batch size (per image).
    ``ops`` lists the transforms to apply, in order.
    """

    ops: tuple[str, ...]
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return next(iter(self.values.values())).shape[0] if self.values else 1


class DSA:
    """A differentiable, siamese-capable augmentation.

    Args:
        strategy: transform names joined by ``_`` (any of :data:`TRANSFORMS`),
            e.g. ``"crop_scale_rotate_cutout"`` (default) or
            ``"color_crop_cutout_flip_scale_rotate"`` for natural images.
        mode: ``"single"`` applies ONE transform drawn at random per call (the
            DSA reference default, mildest); ``"all"`` applies every transform.
        seed: seeds a private generator, so a ``DSA`` object gives a
            reproducible stream of augmentations. ``None`` draws from torch's
            global RNG instead (e.g. under :func:`replaykit.training.seeded`).
        crop, scale, rotate, cutout, brightness, saturation, contrast: strengths.
    """

    def __init__(
        self,
        strategy: str = "crop_scale_rotate_cutout",
        *,
        mode: str = "single",
        seed: int | None = 0,
        crop: float = 0.125,
        scale: float = 1.2,
        rotate: float = 15.0,
        cutout: float = 0.5,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
    ) -> None:
        ops = tuple(p for p in strategy.split("_") if p) if strategy and strategy.lower() != "none" else ()
        unknown = [p for p in ops if p not in TRANSFORMS]
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown} in strategy {strategy!r}; choose from {TRANSFORMS}")
        if mode not in ("single", "all"):
            raise ValueError(f"mode must be 'single' or 'all', got {mode!r}")
        if scale < 1 or crop < 0 or not 0 <= cutout <= 1 or rotate < 0:
            raise ValueError("need scale >= 1, crop >= 0, rotate >= 0 and 0 <= cutout <= 1")
        self.strategy = strategy
        self.ops = ops
        self.mode = mode
        self.seed = seed
        self.crop, self.scale, self.rotate, self.cutout = crop, scale, rotate, cutout
        self.brightness, self.saturation, self.contrast = brightness, saturation, contrast
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, mode={self.mode!r}, seed={self.seed!r})"

    def reseed(self, seed: int) -> "DSA":
        """Restart the private random stream from ``seed``; returns self."""
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        return self

    # -- sampling -------------------------------------------------------------
    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self._generator)

    def sample(self, batch_size: int = 1) -> DSAParams:
        """Draw parameters for ``batch_size`` images (1 = one set shared by any batch)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not self.ops:
            return DSAParams(())
        if self.mode == "single":
            ops = (self.ops[int(torch.randint(len(self.ops), (1,), generator=self._generator))],)
        else:
            ops = tuple(t for t in TRANSFORMS if t in self.ops)
        n = batch_size
        values: dict[str, torch.Tensor] = {}
        for op in ops:
            if op == "color":
                values["brightness"] = (self._rand(n) - 0.5) * self.brightness
                values["saturation"] = self._rand(n) * self.saturation
                values["contrast"] = self._rand(n) + self.contrast
            elif op == "crop":
                values["crop"] = (self._rand(n, 2) * 2 - 1) * self.crop  # fraction of the side, each axis
            elif op == "cutout":
                values["cutout"] = self._rand(n, 2)  # centre, in [0, 1] of each axis
            elif op == "flip":
                values["flip"] = (self._rand(n) < 0.5).float()
            elif op == "scale":
                values["scale"] = 1 / self.scale + self._rand(n, 2) * (self.scale - 1 / self.scale)
            elif op == "rotate":
                values["rotate"] = (self._rand(n) * 2 - 1) * math.radians(self.rotate)
        return DSAParams(ops, values)

    # -- applying -------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Augment ``x`` ``[B, C, H, W]`` with fresh per-image parameters."""
        _check_images(x)
        return self.apply(x, self.sample(x.shape[0]))

    def apply(self, x: torch.Tensor, params: DSAParams) -> torch.Tensor:
        """Apply sampled ``params`` to ``x``; differentiable w.r.t. ``x``.

        ``params`` of batch size 1 broadcast over any batch (siamese use).
        """
        _check_images(x)
        if params.batch_size not in (1, x.shape[0]):
            raise ValueError(f"parameters were sampled for {params.batch_size} images, batch has {x.shape[0]}")
        v = {k: t.to(device=x.device, dtype=x.dtype, non_blocking=True) for k, t in params.values.items()}
        for op in params.ops:
            if op == "color":
                x = _color(x, v["brightness"], v["saturation"], v["contrast"])
            elif op == "crop":
                x = _affine(x, _translation(v["crop"], x.shape))
            elif op == "cutout":
                x = _cutout(x, v["cutout"], self.cutout)
            elif op == "flip":
                sign = 1 - 2 * v["flip"]
                zero = torch.zeros_like(sign)
                x = _affine(x, torch.stack([torch.stack([sign, zero, zero], -1), torch.stack([zero, 1 + zero, zero], -1)], 1))
            elif op == "scale":
                s = v["scale"]
                zero = torch.zeros_like(s[:, 0])
                theta = torch.stack([torch.stack([s[:, 0], zero, zero], -1), torch.stack([zero, s[:, 1], zero], -1)], 1)
                x = _affine(x, theta)
            elif op == "rotate":
                a = v["rotate"]
                zero = torch.zeros_like(a)
                theta = torch.stack(
                    [torch.stack([torch.cos(a), torch.sin(-a), zero], -1), torch.stack([torch.sin(a), torch.cos(a), zero], -1)], 1
                )
                x = _affine(x, theta)
        return x


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"augmentation expects float images [B, C, H, W], got {shape}")


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp ``x`` by affine ``theta`` ([1 or B, 2, 3]); zeros (the mean) fill the border."""
    theta = theta.expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _translation(shift: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Affine matrices shifting by whole pixels (``shift`` is a fraction of each side)."""
    h, w = shape[-2], shape[-1]
    # whole-pixel shifts keep the image sharp (exact resampling), as in DSA's crop
    dx = torch.round(shift[:, 1] * w) * 2 / max(w - 1, 1)
    dy = torch.round(shift[:, 0] * h) * 2 / max(h - 1, 1)
    one, zero = torch.ones_like(dx), torch.zeros_like(dx)
    return torch.stack([torch.stack([one, zero, dx], -1), torch.stack([zero, one, dy], -1)], 1)


def _cutout(x: torch.Tensor, centre: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero a square of ``ratio`` of the side around ``centre`` (in [0, 1]^2)."""
    h, w = x.shape[-2], x.shape[-1]
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.round(centre[:, 0] * (h + (1 - ch % 2)) - ch / 2)  # top edge, may fall outside
    cx = torch.round(centre[:, 1] * (w + (1 - cw % 2)) - cw / 2)
    rows = torch.arange(h, device=x.device, dtype=x.dtype)
    cols = torch.arange(w, device=x.device, dtype=x.dtype)
    in_rows = (rows[None, :] >= cy[:, None]) & (rows[None, :] < cy[:, None] + ch)
    in_cols = (cols[None, :] >= cx[:, None]) & (cols[None, :] < cx[:, None] + cw)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


def _color(x: torch.Tensor, brightness: torch.Tensor, saturation: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    x = x + brightness[:, None, None, None]
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * saturation[:, None, None, None] + mean_c
    mean_all = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean_all) * contrast[:, None, None, None] + mean_all


def dsa_strategy(dataset: str | None) -> str:
    """DSA's transform set for a dataset: no flips or colour for digits, everything for natural images."""
    natural = dataset is not None and dataset.lower().replace("-", "") in ("cifar10",)
    return "color_crop_cutout_flip_scale_rotate" if natural else "crop_scale_rotate_cutout"


class ReplayAugment:
    """DSA's random transforms applied to one replayed image at a time (``[C, H, W] -> [C, H, W]``),
    a plain torchvision-style transform for a replay buffer's dataset.

    Why: a buffer of a few hundred images is replayed tens of times per experience, so the
    learner memorises it; distilled images were also learned under these transforms.
    ``seed`` seeds a private generator: the same seed gives the same stream of transforms.
    """

    def __init__(self, dataset: str | None = None, *, seed: int = 0) -> None:
        self.dsa = DSA(dsa_strategy(dataset), seed=seed)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            raise ValueError(f"ReplayAugment transforms one image [C, H, W], got {getattr(image, 'shape', type(image).__name__)}")
        return self.dsa(image[None])[0]

    def __repr__(self) -> str:
        return f"ReplayAugment({self.dsa.strategy!r}, seed={self.dsa.seed})"

