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
from typing import Any, ClassVar

import torch

from ..augment import DSA, DSAParams, dsa_strategy
from ..buffer import decode_upsample
from ..codecs import decoder_meta
from ..jpeg_sim import simulate_jpeg
from ..progress import progress_bar
from .base import DistillResult, Distiller, check_loop_options
from .features import RandomConvNets, class_index, derive_seed, embed, real_pick
from ..typed import check_positive_int

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
        jpeg_quality: the quality a JPEG buffer will hold the images at (``0``: not JPEG). The matching
            then sees them through a differentiable JPEG (:mod:`replaykit.jpeg_sim`): at low qualities
            little more than each 8x8 block's mean survives the codec, and this puts what is learned there.
            Needs the dataset's mean / std in ``meta``.
        device: where the matching runs (see :class:`~replaykit.distill.base.Distiller`).
        batch_classes: one forward over all classes per iteration (one backward, no host sync per
            class) instead of one per class. ``None`` (default): on for CUDA, off for the CPU, where
            small per-class batches are faster and give today's exact bytes. Same random draws either
            way; the images agree to float rounding.
        beside: per class, fixed images (normalised, as they will be replayed) that the learned ones will be
            held beside, e.g. the real part of a hybrid memory. The matching then compares the class with the
            learned and fixed images together, so the learned images supply what the fixed ones lack instead
            of repeating what they already hold. Runs the per-class loop; only methods that define
            :meth:`match_loss_beside` (``dm``) take it.
    """

    #: True where :meth:`match_loss_beside` is defined (the method takes ``beside``).
    learns_beside: ClassVar[bool] = False

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
        jpeg_quality: int = 0,
        seed: int = 0,
        progress: bool = True,
        device: str | torch.device | None = "cpu",
        batch_classes: bool | None = None,
        beside: dict[int, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(ipc, seed=seed, progress=progress, device=device)
        check_loop_options(iterations, time_budget, "real" if init == "herding" else init)
        if batch_classes not in (None, True, False):
            raise ValueError(f"batch_classes must be True, False or None (auto: on for CUDA), got {batch_classes!r}")
        check_positive_int("factor", factor)
        if learner is not None and not callable(getattr(learner, "embed", None)):
            raise ValueError("learner must be a network with an .embed(images) method (a replaykit.networks network)")
        if bits not in (1, 2, 4, 8) or isinstance(bits, bool):
            raise ValueError(f"bits must be one of 1, 2, 4, 8, got {bits!r}")
        if not (isinstance(jpeg_quality, int) and not isinstance(jpeg_quality, bool) and 0 <= jpeg_quality <= 100):
            raise ValueError(f"jpeg_quality must be an int in [1, 100], or 0 for no JPEG, got {jpeg_quality!r}")
        if jpeg_quality and bits < 8:
            raise ValueError(f"bits={bits} and jpeg_quality={jpeg_quality} are two stored forms: a buffer holds one")
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
        self.jpeg_quality = jpeg_quality
        self.learner_weight = float(learner_weight)
        self.batch_classes = batch_classes
        self._learner = learner
        self._beside = self._checked_beside(beside)

    def _checked_beside(self, beside: dict[int, torch.Tensor] | None) -> dict[int, torch.Tensor] | None:
        """``beside`` validated: a dict of class -> finite float images ``[n, C, H, W]``, for a method that can use it."""
        if beside is None:
            return None
        if not self.learns_beside:
            raise ValueError(f"{self.name} cannot learn images beside fixed ones (beside): use dm")
        if self.batch_classes:
            raise ValueError("beside runs the per-class loop: leave batch_classes unset or False")
        if not isinstance(beside, dict):
            raise TypeError(f"beside must be a dict of class -> images, got {type(beside).__name__}")
        for cls, fixed in beside.items():
            if not isinstance(cls, int) or isinstance(cls, bool):
                raise TypeError(f"beside's keys must be int classes, got {cls!r}")
            if not isinstance(fixed, torch.Tensor) or fixed.ndim != 4 or not fixed.is_floating_point():
                raise ValueError(f"beside[{cls}] must be float images [n, C, H, W], got {getattr(fixed, 'shape', type(fixed).__name__)}")
            if not torch.isfinite(fixed).all():
                raise ValueError(f"beside[{cls}] contains NaN or inf")
        return {cls: fixed.detach().float() for cls, fixed in beside.items()}

    def match_loss(self, net, real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
        """Discrepancy between the real and synthetic batches of one class under ``net``."""
        raise NotImplementedError

    def match_loss_grouped(self, net, real: torch.Tensor, syn: torch.Tensor, groups: int) -> torch.Tensor:
        """Sum of :meth:`match_loss` over ``groups`` classes stacked in equal blocks (class-major).

        Methods override it with one forward over all blocks; this fallback loops.
        """
        return sum(self.match_loss(net, r, f) for r, f in zip(real.chunk(groups), syn.chunk(groups)))

    def match_loss_beside(self, net, real: torch.Tensor, syn: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Discrepancy between the real batch and the synthetic images held together with ``fixed`` ones."""
        raise NotImplementedError

    def distill(self, images, labels, *, num_classes=None, meta=None):  # noqa: D102 (documented in Distiller)
        self._dataset = (meta or {}).get("dataset")
        if (self.bits < 8 or self.jpeg_quality) and not {"mean", "std"} <= set(meta or {}):
            setting = f"bits={self.bits}" if self.bits < 8 else f"jpeg_quality={self.jpeg_quality}"
            raise ValueError(f"{setting} needs the dataset's mean and std in meta (dataset_info(name).meta())")
        self._norm = [torch.tensor((meta or {}).get(k, [0.0]), dtype=torch.float32).view(1, -1, 1, 1) for k in ("mean", "std")]
        for cls, fixed in (self._beside or {}).items():
            if isinstance(images, torch.Tensor) and fixed.shape[1:] != images.shape[1:]:
                raise ValueError(f"beside[{cls}] holds images of shape {tuple(fixed.shape[1:])}, the data {tuple(images.shape[1:])}")
        return super().distill(images, labels, num_classes=num_classes, meta=meta)

    def _initial_images(self, images: torch.Tensor, index: torch.Tensor, cls: int, gen: torch.Generator) -> torch.Tensor:
        """The starting synthetic set of one class, at the stored (possibly reduced) resolution."""
        c, h, w = images.shape[1:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"factor {self.factor} does not divide the image size {h}x{w}")
        if self.init == "noise":
            return torch.randn((self.ipc, c, h // self.factor, w // self.factor), generator=gen).to(images.device)
        start = images[self._start_index(images, index, cls)].clone()
        return torch.nn.functional.avg_pool2d(start, self.factor) if self.factor > 1 else start

    def _start_index(self, images: torch.Tensor, index: torch.Tensor, cls: int) -> torch.Tensor:
        """Indices (into ``images``) of the real images one class starts from: herding's picks or a seeded draw."""
        if self.init == "herding":
            from .herding import herding_order

            learner = getattr(self, "_learner_copy", None)
            probe = learner if learner is not None else RandomConvNets(images.shape[1:], width=self.width, device=images.device).sample(derive_seed(self.seed, cls, 4))
            feats = torch.nn.functional.normalize(embed(probe, images[index]), dim=1).cpu()
            return index[herding_order(feats, self.ipc)]
        return real_pick(index, self.ipc, derive_seed(self.seed, cls, 0))

    def _decoded(self, syn: torch.Tensor) -> torch.Tensor:
        """What the buffer will replay: stored pixels rounded to ``bits`` or JPEG-coded (straight-through), then decoded."""
        if self.jpeg_quality or self.bits < 8:  # one stored form at most (checked in __init__)
            mean, std = (t.to(syn.device) for t in self._norm)
            pixels = syn * std + mean
            if self.jpeg_quality:
                stored = simulate_jpeg((pixels * 255).clamp(0, 255), self.jpeg_quality) / 255
            else:
                levels = 2 ** self.bits - 1
                rounded = (pixels.clamp(0, 1) * levels).round() / levels
                stored = pixels + (rounded - pixels).detach()
            syn = (stored - mean) / std
        return decode_upsample(syn, self.factor)

    def _class_pair(self, images: torch.Tensor, index: torch.Tensor, syn: torch.Tensor, gen: torch.Generator,
                    cls: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration's (real batch, decoded synthetic batch) of one class: ``real_batch`` random real images
        against the whole synthetic set."""
        pick = index[torch.randint(index.numel(), (self.real_batch,), generator=gen)]
        return images[pick], self._decoded(syn)

    def _distill(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int], num_classes: int) -> DistillResult:
        start = time.perf_counter()
        nets = RandomConvNets(images.shape[1:], width=self.width, depth=self.depth, device=images.device)
        dsa = dsa_for(getattr(self, "_dataset", None)) if self.augment else None
        index = {c: class_index(labels, c) for c in classes}
        gens = {c: torch.Generator().manual_seed(derive_seed(self.seed, c, 1)) for c in classes}
        learner = None
        if self._learner is not None:  # a frozen private copy on the work's device: the caller's network is never touched
            learner = copy.deepcopy(self._learner).eval().requires_grad_(False).to(images.device)
        self._learner_copy = learner
        syn = {c: self._initial_images(images, index[c], c, gens[c]).requires_grad_(True) for c in classes}
        self._learner_copy = None
        opt = torch.optim.SGD(list(syn.values()), lr=self.lr, momentum=0.5)
        self._norm = [t.to(images.device) for t in getattr(self, "_norm", [])]  # once, not every iteration
        batched = self.batch_classes if self.batch_classes is not None else images.device.type != "cpu" and self._beside is None
        beside = {c: f.to(images.device) for c, f in (self._beside or {}).items() if c in classes and len(f)}

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
            if batched:
                total = self._batched_step(net, learner, dsa, images, index, gens, syn, classes, it)
            for c in classes if not batched else ():  # per class: smaller batches run faster on CPU than one big one
                real, fake = self._class_pair(images, index[c], syn[c], gens[c], c)
                fixed = beside.get(c)
                if dsa is not None:  # siamese: one parameter draw applied to both batches (and the fixed images)
                    params = dsa.reseed(derive_seed(self.seed, c, it, 3)).sample(1)
                    real, fake = dsa.apply(real, params), dsa.apply(fake, params)
                    fixed = dsa.apply(fixed, params) if fixed is not None else None
                loss = self._pair_loss(net, real, fake, fixed)
                if learner is not None and self.learner_weight > 0:
                    loss = loss + self.learner_weight * self._pair_loss(learner, real, fake, fixed)
                loss.backward()
                total += float(loss.detach()) / len(classes)
            opt.step()
            done += 1
            per_iter = (time.perf_counter() - start) / done
            bar.update(1)
            if not batched or (self.progress and (it % 50 == 0 or it == self.iterations - 1)):  # batched: sync rarely
                bar.set_postfix(loss=f"{float(total):.3g}")
        bar.close()
        elapsed = time.perf_counter() - start
        if self.time_budget is not None and elapsed > self.time_budget and done <= 1:
            raise ValueError(
                f"time_budget of {self.time_budget:g} s is too small: one {self.name} iteration took {elapsed:.2f} s "
                f"on this machine ({len(classes)} classes); raise the budget or lower real_batch/width"
            )
        out = torch.cat([syn[c].detach() for c in classes])
        self._learner_copy = None
        ids = torch.tensor([c for c in classes for _ in range(self.ipc)], dtype=torch.int64)
        extra: dict[str, Any] = {
            "iterations_done": done,
            "stopped_by": stopped_by,
            "augment": repr(dsa) if dsa is not None else None,
            "label_kind": "hard",
            "learner_aware": learner is not None,
        }
        if batched:
            extra["batched_classes"] = True
        extra.update(self._stored_form_meta())
        if beside:
            extra["learned_beside"] = {str(c): len(f) for c, f in beside.items()}
        return DistillResult(out, ids.clone(), ids, extra)

    def _stored_form_meta(self) -> dict[str, Any]:
        """What the buffer needs to hold the learned images in the form they were learned for."""
        meta: dict[str, Any] = {}
        if self.factor > 1:
            meta["decoder"] = decoder_meta(self.factor)
        if self.bits < 8:
            meta["pixel_bits"] = self.bits
        if self.jpeg_quality:
            meta["learned_for_jpeg_quality"] = self.jpeg_quality
        return meta

    def _pair_loss(self, net, real: torch.Tensor, fake: torch.Tensor, fixed: torch.Tensor | None) -> torch.Tensor:
        return self.match_loss(net, real, fake) if fixed is None else self.match_loss_beside(net, real, fake, fixed)


    def _batched_step(self, net, learner, dsa: DSA | None, images: torch.Tensor, index: dict[int, torch.Tensor],
                      gens: dict[int, torch.Generator], syn: dict[int, torch.Tensor], classes: list[int], it: int) -> torch.Tensor:
        """One iteration over all classes in one forward and one backward; returns the mean loss (on the device).

        Draws exactly what the per-class loop draws (the same generators in the same order), so
        the two paths see the same real batches, networks and augmentations.
        """
        picks = [index[c][torch.randint(index[c].numel(), (self.real_batch,), generator=gens[c])] for c in classes]
        real = images[torch.cat(picks).to(images.device, non_blocking=True)]
        fake = self._decoded(torch.cat([syn[c] for c in classes]))
        if dsa is not None:
            params = [dsa.reseed(derive_seed(self.seed, c, it, 3)).sample(1) for c in classes]
            real = _siamese_grouped(dsa, real, params, self.real_batch)
            fake = _siamese_grouped(dsa, fake, params, self.ipc)
        loss = self.match_loss_grouped(net, real, fake, len(classes))
        if learner is not None and self.learner_weight > 0:
            loss = loss + self.learner_weight * self.match_loss_grouped(learner, real, fake, len(classes))
        loss.backward()
        return loss.detach() / len(classes)


def _siamese_grouped(dsa: DSA, x: torch.Tensor, params: list[DSAParams], per_class: int) -> torch.Tensor:
    """Apply class ``i``'s parameters to block ``i`` of ``x`` (``per_class`` images each), one call per transform kind.

    With ``mode="single"`` every class draws one transform; classes that drew the same one are
    augmented together with per-image parameters, so an iteration costs a few calls, not one per class.
    """
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.ops, []).append(i)
    blocks = x.view(len(params), per_class, *x.shape[1:])
    order, outs = [], []
    for ops, members in groups.items():
        values = {k: torch.cat([params[i].values[k] for i in members]).repeat_interleave(per_class, dim=0)
                  for k in params[members[0]].values}
        chosen = blocks[torch.tensor(members).to(x.device, non_blocking=True)].flatten(0, 1)
        outs.append(dsa.apply(chosen, DSAParams(ops, values)))
        order += members
    if order == list(range(len(params))):
        return torch.cat(outs)
    inverse = torch.argsort(torch.tensor(order)).to(x.device, non_blocking=True)
    return torch.cat(outs).view(len(params), per_class, *x.shape[1:])[inverse].flatten(0, 1)


class DistributionMatching(MatchingDistiller):
    """``dm``: match the mean final embedding of each class (one layer)."""

    name = "dm"
    learns_beside = True

    def match_loss(self, net, real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real_mean = net.embed(real).mean(0)
        return ((real_mean - net.embed(syn).mean(0)) ** 2).sum()

    def match_loss_beside(self, net, real: torch.Tensor, syn: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The mean embedding of synthetic and fixed images together against the real mean, scaled by
        ``((n_syn + n_fixed) / n_syn) ** 2`` so that the step size means what it means without ``fixed``:
        the same loss as matching the synthetic mean alone to ``real + n_fixed / n_syn * (real - fixed)``."""
        with torch.no_grad():
            real_mean = net.embed(real).mean(0)
            fixed_sum = net.embed(fixed).sum(0)
        n_syn, n_all = syn.shape[0], syn.shape[0] + fixed.shape[0]
        union_mean = (net.embed(syn).sum(0) + fixed_sum) / n_all
        return ((real_mean - union_mean) ** 2).sum() * (n_all / n_syn) ** 2

    def match_loss_grouped(self, net, real: torch.Tensor, syn: torch.Tensor, groups: int) -> torch.Tensor:
        with torch.no_grad():
            real_emb = net.embed(real)
            real_mean = real_emb.view(groups, -1, real_emb.shape[-1]).mean(1)
        syn_emb = net.embed(syn)
        return ((real_mean - syn_emb.view(groups, -1, syn_emb.shape[-1]).mean(1)) ** 2).sum()
