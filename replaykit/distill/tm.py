"""``tm``: trajectory matching (multi-step parameter matching; Cazenavette et al. 2022, "MTT").

First a few *expert* networks are trained on the real data and their parameters are
recorded after every epoch (in memory). Then the synthetic images (and a learnable
student learning rate) are trained so that ``syn_steps`` SGD steps on the synthetic
set, started from an expert checkpoint at epoch ``s``, land near the same expert's
checkpoint at epoch ``s + match_epochs``. The loss is the squared distance to the
target normalised by how far the expert itself moved:
``|theta_student - theta_target|^2 / |theta_start - theta_target|^2``.
The student runs as a functional forward (``torch.func.functional_call``) over one
flat parameter vector, so the whole unrolled trajectory is differentiable.

CPU scale (28x28, 2 cores): a width-32 ConvNet-3, 2 experts of 4 short epochs
(each epoch sees at most ``expert_images`` real images), 10 student steps. The
paper uses width 128, 100 experts of 50 epochs and 30-80 student steps.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..augment import DSA
from ..networks import ConvNet
from ..progress import progress_bar
from ..training import seeded
from .base import DistillResult, Distiller, check_loop_options
from .features import derive_seed, starting_images

__all__ = ["TrajectoryMatching", "record_expert_trajectory"]


def record_expert_trajectory(
    net: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    images_per_epoch: int,
    augment: DSA | None,
    seed: int,
) -> list[torch.Tensor]:
    """Train ``net`` with plain SGD; return its flat parameters at the start and after every epoch."""
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    trajectory = [torch.cat([p.detach().flatten() for p in params]).clone()]
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=gen)[:images_per_epoch]
        for start in range(0, order.numel(), batch_size):
            idx = order[start : start + batch_size]
            x = images[idx] if augment is None else augment(images[idx])
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        trajectory.append(torch.cat([p.detach().flatten() for p in params]).clone())
    return trajectory


class TrajectoryMatching(Distiller):
    """Matching training trajectories (MTT), scaled down for CPU.

    Args:
        ipc: images per class.
        iterations: image updates (each from a random expert and start epoch).
        time_budget: seconds for the whole run, expert training included; the
            experts are always trained, then the loop stops after the update that
            crosses the budget (at least one update runs). ``None``: no limit.
        num_experts, expert_epochs, expert_lr, expert_images: the expert trajectories
            (``expert_images`` caps the real images seen per expert epoch).
        syn_steps: student SGD steps on the synthetic set per update (N).
        match_epochs: how many expert epochs later the target checkpoint is (M).
        max_start_epoch: start checkpoints are drawn from epochs ``[0, max_start_epoch)``.
        lr_img: SGD (momentum 0.5) learning rate of the images.
        lr_lr: SGD learning rate of the learnable student learning rate.
        syn_lr: initial student learning rate.
        batch_syn: synthetic images per student step (``None``: all).
        width, depth: the ConvNet of experts and student.
        init, dsa: initialisation (``"real"``/``"noise"``) and augmentation strategy.
    """

    name = "tm"

    def __init__(
        self,
        ipc: int = 10,
        *,
        iterations: int = 200,
        time_budget: float | None = 45.0,
        num_experts: int = 2,
        expert_epochs: int = 4,
        expert_lr: float = 0.01,
        expert_images: int = 2048,
        syn_steps: int = 10,
        match_epochs: int = 2,
        max_start_epoch: int = 2,
        lr_img: float = 100.0,
        lr_lr: float = 1e-5,
        syn_lr: float = 0.01,
        batch_syn: int | None = None,
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
        if min(num_experts, syn_steps, match_epochs, max_start_epoch, expert_images) < 1:
            raise ValueError("num_experts, syn_steps, match_epochs, max_start_epoch and expert_images must be >= 1")
        if max_start_epoch - 1 + match_epochs > expert_epochs:
            raise ValueError(
                f"expert_epochs={expert_epochs} is too short: targets reach epoch max_start_epoch - 1 + match_epochs "
                f"= {max_start_epoch - 1 + match_epochs}"
            )
        if syn_lr <= 0 or lr_img < 0:
            raise ValueError("syn_lr must be positive and lr_img non-negative")
        self.iterations, self.time_budget = iterations, time_budget
        self.num_experts, self.expert_epochs, self.expert_lr, self.expert_images = num_experts, expert_epochs, expert_lr, expert_images
        self.syn_steps, self.match_epochs, self.max_start_epoch = syn_steps, match_epochs, max_start_epoch
        self.lr_img, self.lr_lr, self.syn_lr, self.batch_syn = lr_img, lr_lr, syn_lr, batch_syn
        self.width, self.depth, self.init, self.dsa = width, depth, init, dsa
        DSA(dsa)  # validate the strategy now

    def _distill(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int], num_classes: int) -> DistillResult:
        start = time.perf_counter()
        shape = images.shape[1:]
        device = images.device
        dev_labels = labels.to(device)  # the experts train where the images are
        experts = []
        for e in progress_bar(range(self.num_experts), enabled=self.progress, desc="tm experts", leave=False):
            with seeded(derive_seed(self.seed, 10, e)):
                net = ConvNet(shape, num_classes, width=self.width, depth=self.depth).to(device)
            experts.append(
                record_expert_trajectory(
                    net, images, dev_labels, epochs=self.expert_epochs, lr=self.expert_lr, batch_size=256,
                    images_per_epoch=self.expert_images, augment=DSA(self.dsa, seed=derive_seed(self.seed, 11, e)),
                    seed=derive_seed(self.seed, 12, e),
                )
            )
        expert_seconds = time.perf_counter() - start

        with seeded(derive_seed(self.seed, 13)):
            student = ConvNet(shape, num_classes, width=self.width, depth=self.depth).to(device)
        names = [n for n, _ in student.named_parameters()]
        shapes = [p.shape for _, p in student.named_parameters()]
        sizes = [p.numel() for _, p in student.named_parameters()]

        def forward(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            tensors = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
            return functional_call(student, tensors, (x,))

        syn = starting_images(images, labels, classes, self.ipc, self.init, self.seed)
        syn_labels = torch.tensor(classes).repeat_interleave(self.ipc).to(device)
        lr = torch.tensor(self.syn_lr, device=device).requires_grad_(True)
        opt_img = torch.optim.SGD([syn], lr=self.lr_img, momentum=0.5)
        opt_lr = torch.optim.SGD([lr], lr=self.lr_lr, momentum=0.5)
        augment = DSA(self.dsa, seed=derive_seed(self.seed, 14))
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 15))
        batch_syn = self.batch_syn or syn.shape[0]
        done, stopped_by, loss = 0, "iterations", torch.zeros(())
        bar = progress_bar(range(self.iterations), enabled=self.progress, desc="tm", leave=False)
        for it in bar:
            trajectory = experts[int(torch.randint(len(experts), (1,), generator=gen))]
            s = int(torch.randint(self.max_start_epoch, (1,), generator=gen))
            begin, target = trajectory[s], trajectory[s + self.match_epochs]
            theta = begin.clone().requires_grad_(True)
            current = theta
            for _ in range(self.syn_steps):
                idx = torch.randperm(syn.shape[0], generator=gen)[:batch_syn]
                ce = F.cross_entropy(forward(current, augment(syn[idx])), syn_labels[idx])
                (grad,) = torch.autograd.grad(ce, current, create_graph=True)
                current = current - lr * grad
            loss = (current - target).pow(2).sum() / (begin - target).pow(2).sum().clamp_min(1e-12)
            opt_img.zero_grad(set_to_none=True)
            opt_lr.zero_grad(set_to_none=True)
            loss.backward()
            opt_img.step()
            opt_lr.step()
            with torch.no_grad():
                lr.clamp_(min=1e-6)
            done = it + 1
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{float(lr.detach()):.4f}")
            if self.time_budget is not None and time.perf_counter() - start > self.time_budget:
                stopped_by = "time_budget"
                break
        bar.close()
        extra = {
            "iterations_done": done,
            "stopped_by": stopped_by,
            "expert_seconds": round(expert_seconds, 3),
            "learned_syn_lr": float(lr.detach()),
            "final_loss": round(float(loss.detach()), 6),
        }
        return DistillResult(syn.detach().clone(), syn_labels, syn_labels.clone(), extra)
