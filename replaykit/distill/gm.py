"""``gm``: gradient matching with differentiable siamese augmentation (Zhao, Mopuri & Bilen 2021; DSA, Zhao & Bilen 2021).

The synthetic images of a class are learned so that the gradient they induce on a
network's weights points the same way as the gradient of a real batch of that class,
layer by layer (sum over output units of ``1 - cosine``). The matching runs on many
networks: an outer loop draws a fresh random initialisation; for ``outer_loop``
rounds it updates the images by gradient matching, then trains the network for
``inner_loop`` steps on the current synthetic set, so that gradients are matched
along a training trajectory, not only at initialisation. The same augmentation
parameters are applied to the real and the synthetic batch (siamese).

CPU scale: the default network is a width-32 ConvNet-3 (the paper uses width 128),
and ``time_budget`` bounds the run.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import DSA
from ..networks import ConvNet
from ..progress import progress_bar
from ..training import seeded
from .base import DistillResult, Distiller, check_loop_options
from .features import class_index, derive_seed, starting_images

__all__ = ["GradientMatching", "gradient_distance"]


def gradient_distance(grads_syn: list[torch.Tensor], grads_real: list[torch.Tensor]) -> torch.Tensor:
    """Layer-wise gradient distance of the DC paper: sum over output units of ``1 - cos``.

    Biases and normalisation scales (1-d parameters) are skipped, as in the reference.
    """
    total = grads_syn[0].new_zeros(())
    for gs, gr in zip(grads_syn, grads_real):
        if gs.ndim == 1:
            continue
        gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        cos = (gs * gr).sum(1) / (gs.norm(dim=1) * gr.norm(dim=1) + 1e-6)
        total = total + (1 - cos).sum()
    return total


class GradientMatching(Distiller):
    """Dataset condensation by (single-step) gradient matching with DSA.

    Args:
        ipc: images per class.
        iterations: outer iterations (each draws a fresh network).
        time_budget: seconds; checked after every image update, so the run stops
            at most one update past it (at least one update always happens).
            ``None``: no limit.
        outer_loop: image updates per network (default from ``ipc``: see ``_default_loops``).
        inner_loop: network training steps on the synthetic set between image updates.
        lr_img: SGD (momentum 0.5) learning rate of the images.
        lr_net: SGD learning rate of the network in the inner loop.
        batch_real: real images per class per matching step.
        width, depth: ConvNet used for matching.
        init: ``"real"`` (random real images) or ``"noise"``.
        dsa: augmentation strategy (see :class:`~replaykit.augment.DSA`), ``"none"`` to disable.
    """

    name = "gm"

    def __init__(
        self,
        ipc: int = 10,
        *,
        iterations: int = 100,
        time_budget: float | None = 45.0,
        outer_loop: int | None = None,
        inner_loop: int | None = None,
        lr_img: float = 0.1,
        lr_net: float = 0.01,
        batch_real: int = 64,
        width: int = 32,
        depth: int = 3,
        init: str = "real",
        dsa: str = "crop_scale_rotate_cutout",
        seed: int = 0,
        progress: bool = True,
        device: str | torch.device | None = "cpu",
    ) -> None:
        super().__init__(ipc, seed=seed, progress=progress, device=device)
        check_loop_options(iterations, time_budget, init)
        default_outer, default_inner = _default_loops(ipc)
        self.iterations = iterations
        self.time_budget = time_budget
        self.outer_loop = outer_loop if outer_loop is not None else default_outer
        self.inner_loop = inner_loop if inner_loop is not None else default_inner
        if self.outer_loop < 1 or self.inner_loop < 0:
            raise ValueError("outer_loop must be >= 1 and inner_loop >= 0")
        self.lr_img, self.lr_net, self.batch_real = lr_img, lr_net, batch_real
        self.width, self.depth, self.init, self.dsa = width, depth, init, dsa
        DSA(dsa)  # validate the strategy now, not mid-run

    def _distill(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int], num_classes: int) -> DistillResult:
        start = time.perf_counter()
        index = {c: class_index(labels, c) for c in classes}
        syn = starting_images(images, labels, classes, self.ipc, self.init, self.seed)
        syn_labels = torch.tensor(classes).repeat_interleave(self.ipc).to(images.device)
        opt_img = torch.optim.SGD([syn], lr=self.lr_img, momentum=0.5)
        augment = DSA(self.dsa, seed=derive_seed(self.seed, 1))
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 2))
        done, updates, stopped_by = 0, 0, "iterations"
        bar = progress_bar(range(self.iterations), enabled=self.progress, desc="gm", leave=False)
        for it in bar:
            with seeded(derive_seed(self.seed, 3, it)):
                net = ConvNet(images.shape[1:], num_classes, width=self.width, depth=self.depth).to(images.device)
            params = [p for p in net.parameters()]
            opt_net = torch.optim.SGD(params, lr=self.lr_net, momentum=0.5)
            for ol in range(self.outer_loop):
                loss = syn.new_zeros(())
                for i, c in enumerate(classes):
                    idx = index[c][torch.randint(index[c].numel(), (min(self.batch_real, index[c].numel()),), generator=gen)]
                    real_c = images[idx]
                    syn_c = syn[i * self.ipc : (i + 1) * self.ipc]
                    aug = augment.sample(1)
                    real_c, syn_c = augment.apply(real_c, aug), augment.apply(syn_c, aug)
                    target = torch.full((real_c.shape[0],), c, dtype=torch.int64, device=images.device)
                    g_real = torch.autograd.grad(F.cross_entropy(net(real_c), target), params)
                    g_real = [g.detach() for g in g_real]
                    g_syn = torch.autograd.grad(F.cross_entropy(net(syn_c), target[: syn_c.shape[0]]), params, create_graph=True)
                    loss = loss + gradient_distance(list(g_syn), g_real)
                opt_img.zero_grad(set_to_none=True)
                loss.backward()
                opt_img.step()
                updates += 1
                if self.time_budget is not None and time.perf_counter() - start > self.time_budget:
                    stopped_by = "time_budget"
                    break
                if ol == self.outer_loop - 1:
                    break
                _train_steps(net, opt_net, syn.detach(), syn_labels, self.inner_loop, augment)
            done = it + 1
            bar.set_postfix(loss=f"{float(loss.detach()) / len(classes):.3f}")
            if stopped_by == "time_budget":
                break
        bar.close()
        return DistillResult(
            syn.detach().clone(), syn_labels, syn_labels.clone(), {"iterations_done": done, "image_updates": updates, "stopped_by": stopped_by}
        )


def _default_loops(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) per ipc.

    The DC paper uses (1, 1), (10, 50), (50, 10) for ipc 1, 10, 50; the inner loops
    are shortened here so that a CPU run sees many more network initialisations.
    """
    if ipc == 1:
        return 1, 1
    if ipc <= 10:
        return 10, 10
    return 20, 5


def _train_steps(net: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, steps: int, augment: DSA) -> None:
    """A few full-batch SGD steps on the synthetic set (the synthetic set is small)."""
    for _ in range(steps):
        loss = F.cross_entropy(net(augment(images)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
