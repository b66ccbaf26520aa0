"""``dm``: distribution matching (Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023).

For each class, learn synthetic images whose mean embedding matches the mean
embedding of the real images of that class, under a *new randomly initialised*
ConvNet every iteration. No bi-level optimisation and no network training,
which is why it is the fast method on CPU. Classes never interact, so each class
is distilled with its own random streams: the images of class ``c`` do not
depend on which other classes were distilled in the same call.

:class:`MatchingDistiller` holds the loop shared with ``dm-multi``; subclasses
only define :meth:`MatchingDistiller.match_loss`.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch

from ..augment import DSA, dsa_strategy
from ..buffer import decode_upsample
from ..progress import progress_bar
from .base import DistillResult, Distiller, check_loop_options
from .features import RandomConvNets, class_index, derive_seed, embed, real_init

__all__ = ["MatchingDistiller", "DistributionMatching", "dsa_for"]


def dsa_for(dataset: str | None) -> DSA:
    """The DSA transform set for a dataset: no flips or colour for digits, everything for natural images."""
    return DSA(dsa_strategy(dataset), seed=0)


class MatchingDistiller(Distiller):
    """Shared loop: per-iteration random ConvNet, per-class real batch, siamese augmentation.

    Args:
        ipc: synthetic images per class.
        iterations: maximum number of outer iterations (one random network each).
        time_budget: seconds; stop before an iteration that would overrun it. ``None``: no limit.
            If not even one iteration fits, ``distill`` raises ``ValueError``.
        lr: learning rate of the synthetic images (SGD, momentum 0.5, as in the reference code).
        real_batch: real images per class per iteration.
        width, depth: the random ConvNet (narrower than the evaluation ConvNet for CPU speed).
        augment: differentiable siamese augmentation of real and synthetic batches.
        init: ``"real"`` (start from random real images), ``"herding"`` (from the real images herding
            picks in the learner's, else a random network's, embedding) or ``"noise"``.
        factor: store images at ``1/factor`` of the input resolution and decode them by bilinear
            upsampling (IDC's multi-formation): ``factor**2`` times as many images for the same bytes.
            Matching runs through the decoder, so the low-resolution pixels are what is learned. It pays for small
            buffers (IPC 1-10) and costs accuracy from about IPC 50 (benchmarks/RESULTS.md, PROTOCOL B).
        learner: a trained network with ``.embed`` (e.g. the continual learner at the end of an
            experience). When given, every iteration also matches the mean embedding under it
            (learner-aware, IDM-style), beside the random network.
        learner_weight: weight of the learner's term.
        bits: grey levels the images are kept at (uint8 storage packs ``8 // bits`` pixels to a byte);
            below 8 the matching sees the quantised pixels (straight-through rounding), so the images
            are learned for the precision they will be stored at. Needs the dataset's mean / std in ``meta``.
    """

    def __init__(
        self,
        ipc: int = 10,
        *,
        iterations: int = 2000,
        time_budget: float | None = None,
        lr: float = 1.0,
        real_batch: int = 64,
        width: int = 32,
        depth: int = 3,
        augment: bool = True,
        init: str = "real",
        factor: int = 1,
        learner: torch.nn.Module | None = None,
        learner_weight: float = 1.0,
        bits: int = 8,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(ipc, seed=seed, progress=progress)
        check_loop_options(iterations, time_budget, "real" if init == "herding" else init)
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f"factor must be a positive int, got {factor!r}")
        if learner is not None and not callable(getattr(learner, "embed", None)):
            raise ValueError("learner must be a network with an .embed(images) method (a replaykit.networks network)")
        if bits not in (1, 2, 4, 8) or isinstance(bits, bool):
            raise ValueError(f"bits must be one of 1, 2, 4, 8, got {bits!r}")
        if not (learner_weight >= 0 and math.isfinite(learner_weight)):
            raise ValueError(f"learner_weight must be >= 0, got {learner_weight!r}")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be positive, got {lr!r}")
        if real_batch < 1 or width < 1 or depth < 1:
            raise ValueError(f"real_batch, width and depth must be >= 1, got {real_batch}, {width}, {depth}")
        self.iterations = iterations
        self.time_budget = None if time_budget is None else float(time_budget)
        self.lr = float(lr)
        self.real_batch = real_batch
        self.width = width
        self.depth = depth
        self.augment = augment
        self.init = init
        self.factor = factor
        self.bits = bits
        self.learner_weight = float(learner_weight)
        self._learner = learner

    def match_loss(self, net, real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
        """Discrepancy between the real and synthetic batches of one class under ``net``."""
        raise NotImplementedError

    def distill(self, images, labels, *, num_classes=None, meta=None):  # noqa: D102 (documented in Distiller)
        self._dataset = (meta or {}).get("dataset")
        if self.bits < 8 and not {"mean", "std"} <= set(meta or {}):
            raise ValueError(f"bits={self.bits} needs the dataset's mean and std in meta (dataset_info(name).meta())")
        self._norm = [torch.tensor((meta or {}).get(k, [0.0]), dtype=torch.float32).view(1, -1, 1, 1) for k in ("mean", "std")]
        return super().distill(images, labels, num_classes=num_classes, meta=meta)

    def _initial_images(self, images: torch.Tensor, index: torch.Tensor, cls: int, gen: torch.Generator) -> torch.Tensor:
        """The starting synthetic set of one class, at the stored (possibly reduced) resolution."""
        c, h, w = images.shape[1:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"factor {self.factor} does not divide the image size {h}x{w}")
        if self.init == "noise":
            return torch.randn((self.ipc, c, h // self.factor, w // self.factor), generator=gen)
        if self.init == "herding":
            from .herding import herding_order

            probe = self._learner if self._learner is not None else RandomConvNets(images.shape[1:], width=self.width).sample(derive_seed(self.seed, cls, 4))
            feats = torch.nn.functional.normalize(embed(probe, images[index]), dim=1)
            start = images[index[herding_order(feats, self.ipc)]].clone()
        else:
            start = real_init(images, index, self.ipc, derive_seed(self.seed, cls, 0))
        return torch.nn.functional.avg_pool2d(start, self.factor) if self.factor > 1 else start

    def _decoded(self, syn: torch.Tensor) -> torch.Tensor:
        """What the buffer will replay: stored pixels rounded to ``bits`` (straight-through), then decoded."""
        if self.bits < 8:
            mean, std = self._norm
            levels = 2 ** self.bits - 1
            pixels = syn * std + mean
            rounded = (pixels.clamp(0, 1) * levels).round() / levels
            syn = (pixels + (rounded - pixels).detach() - mean) / std
        return decode_upsample(syn, self.factor)

    def _distill(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int], num_classes: int) -> DistillResult:
        start = time.perf_counter()
        nets = RandomConvNets(images.shape[1:], width=self.width, depth=self.depth)
        dsa = dsa_for(getattr(self, "_dataset", None)) if self.augment else None
        index = {c: class_index(labels, c) for c in classes}
        gens = {c: torch.Generator().manual_seed(derive_seed(self.seed, c, 1)) for c in classes}
        syn = {c: self._initial_images(images, index[c], c, gens[c]).requires_grad_(True) for c in classes}
        opt = torch.optim.SGD(list(syn.values()), lr=self.lr, momentum=0.5)
        learner = None
        if self._learner is not None:  # a frozen private copy: the caller's network is never touched
            learner = copy.deepcopy(self._learner).eval().requires_grad_(False)

        done, stopped_by, per_iter = 0, "iterations", 0.0
        bar = progress_bar(total=self.iterations, enabled=self.progress, desc=self.name, leave=False)
        for it in range(self.iterations):
            elapsed = time.perf_counter() - start
            if self.time_budget is not None and done and elapsed + per_iter > self.time_budget:
                stopped_by = "time_budget"
                break
            net = nets.sample(derive_seed(self.seed, it, 2))
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for c in classes:  # per class: smaller batches run faster on CPU than one big one
                pick = index[c][torch.randint(index[c].numel(), (self.real_batch,), generator=gens[c])]
                real, fake = images[pick], self._decoded(syn[c])
                if dsa is not None:  # siamese: one parameter draw applied to both batches
                    params = dsa.reseed(derive_seed(self.seed, c, it, 3)).sample(1)
                    real, fake = dsa.apply(real, params), dsa.apply(fake, params)
                loss = self.match_loss(net, real, fake)
                if learner is not None and self.learner_weight > 0:
                    loss = loss + self.learner_weight * self.match_loss(learner, real, fake)
                loss.backward()
                total += float(loss.detach()) / len(classes)
            opt.step()
            done += 1
            per_iter = (time.perf_counter() - start) / done
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3g}")
        bar.close()
        elapsed = time.perf_counter() - start
        if self.time_budget is not None and elapsed > self.time_budget and done <= 1:
            raise ValueError(
                f"time_budget of {self.time_budget:g} s is too small: one {self.name} iteration took {elapsed:.2f} s "
                f"on this machine ({len(classes)} classes); raise the budget or lower real_batch/width"
            )
        out = torch.cat([syn[c].detach() for c in classes])
        ids = torch.tensor([c for c in classes for _ in range(self.ipc)], dtype=torch.int64)
        extra: dict[str, Any] = {
            "iterations_done": done,
            "stopped_by": stopped_by,
            "augment": repr(dsa) if dsa is not None else None,
            "label_kind": "hard",
            "learner_aware": learner is not None,
        }
        if self.factor > 1:
            extra["decoder"] = {"kind": "upsample", "factor": self.factor, "mode": "bilinear"}
        if self.bits < 8:
            extra["pixel_bits"] = self.bits
        return DistillResult(out, ids.clone(), ids, extra)


class DistributionMatching(MatchingDistiller):
    """``dm``: match the mean final embedding of each class (one layer)."""

    name = "dm"

    def match_loss(self, net, real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real_mean = net.embed(real).mean(0)
        return ((real_mean - net.embed(syn).mean(0)) ** 2).sum()
