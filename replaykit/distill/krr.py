"""``krr``: performance matching by kernel meta-learning (in the spirit of KIP, RFAD and FRePo).

Kernel ridge regression (KRR) fitted on the synthetic set is a closed-form
"trained model": its predictions on real images are differentiable with respect
to the synthetic images (and labels). We learn the synthetic set so that the KRR
predictor built on it fits batches of real images. The kernel is the inner
product of embeddings of a *randomly initialised* ConvNet, re-drawn every step
(random-feature kernel, as in RFAD), so the set works for many networks rather
than one.

All classes are distilled jointly (KRR separates them against each other).
Regression targets are one-hot rows centred by ``1/C`` over the ``C`` classes
present. With ``learn_labels=True`` each synthetic image carries learnable
logits; its regression target is ``softmax(logits)`` (centred), and the buffer
stores that softmax as a probability row (zero for classes not present), which
is the soft-label format of :class:`~replaykit.buffer.SyntheticBuffer`.
"""

from __future__ import annotations

import math
import time

import torch

from ..progress import progress_bar
from .base import DistillResult, Distiller, check_loop_options
from .features import RandomConvNets, derive_seed, starting_images

__all__ = ["KernelRidgeDistiller", "krr_predict"]


def krr_predict(feat_train: torch.Tensor, targets: torch.Tensor, feat_test: torch.Tensor, reg: float) -> torch.Tensor:
    """Kernel ridge regression with a linear kernel on features.

    ``reg`` is relative to the mean diagonal of the train kernel, so it does not
    depend on the feature scale.
    """
    k_tt = feat_train @ feat_train.T
    ridge = reg * k_tt.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(k_tt.shape[0], dtype=k_tt.dtype, device=k_tt.device)
    alpha = torch.linalg.solve(k_tt + ridge * eye, targets)
    return (feat_test @ feat_train.T) @ alpha


class KernelRidgeDistiller(Distiller):
    """Learn a synthetic set whose KRR predictor (random ConvNet features) fits real data.

    Args:
        ipc: images per class.
        iterations: optimisation steps (each with a fresh random network and real batch).
        time_budget: seconds; stop after the step that crosses it (at least one
            step always runs). ``None``: no limit.
        lr_img: Adam learning rate of the images.
        learn_labels: also learn soft labels (stored as probability rows).
        lr_labels: Adam learning rate of the label logits.
        batch_real: real images per step (all classes together).
        reg: ridge regularisation relative to the mean kernel diagonal.
        width, depth: the random ConvNet.
        init: ``"real"`` (random real images) or ``"noise"``.
    """

    name = "krr"

    def __init__(
        self,
        ipc: int = 10,
        *,
        iterations: int = 300,
        time_budget: float | None = 45.0,
        lr_img: float = 0.01,
        learn_labels: bool = False,
        lr_labels: float = 0.01,
        batch_real: int = 128,
        reg: float = 1e-2,
        width: int = 64,
        depth: int = 3,
        init: str = "real",
        seed: int = 0,
        progress: bool = True,
        device: str | torch.device | None = "cpu",
    ) -> None:
        super().__init__(ipc, seed=seed, progress=progress, device=device)
        check_loop_options(iterations, time_budget, init)
        if reg <= 0:
            raise ValueError(f"reg must be positive, got {reg}")
        self.iterations, self.time_budget = iterations, time_budget
        self.lr_img, self.learn_labels, self.lr_labels = lr_img, learn_labels, lr_labels
        self.batch_real, self.reg, self.width, self.depth, self.init = batch_real, reg, width, depth, init

    def _distill(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int], num_classes: int) -> DistillResult:
        start = time.perf_counter()
        n_cls = len(classes)
        column = torch.full((num_classes,), -1, dtype=torch.int64)
        column[torch.tensor(classes)] = torch.arange(n_cls)
        syn = starting_images(images, labels, classes, self.ipc, self.init, self.seed)
        syn_class = torch.tensor(classes).repeat_interleave(self.ipc)
        onehot = torch.nn.functional.one_hot(column[syn_class], n_cls).float().to(images.device)
        # label smoothing 0.1 so that the initial logits are finite
        logits = torch.log(onehot * 0.9 + 0.1 / n_cls).requires_grad_(self.learn_labels)
        groups = [{"params": [syn], "lr": self.lr_img}]
        if self.learn_labels:
            groups.append({"params": [logits], "lr": self.lr_labels})
        opt = torch.optim.Adam(groups)
        probes = RandomConvNets(images.shape[1:], width=self.width, depth=self.depth, device=images.device)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 2))
        done, stopped_by, loss = 0, "iterations", torch.zeros(())
        bar = progress_bar(range(self.iterations), enabled=self.progress, desc="krr", leave=False)
        for it in bar:
            net = probes.sample(derive_seed(self.seed, 3, it))
            pick = torch.randint(images.shape[0], (min(self.batch_real, images.shape[0]),), generator=gen)
            with torch.no_grad():
                feat_real = net.embed(images[pick])
            real_targets = torch.nn.functional.one_hot(column[labels[pick]], n_cls).float().to(images.device) - 1 / n_cls
            syn_targets = (logits.softmax(1) if self.learn_labels else onehot) - 1 / n_cls
            feat_syn = net.embed(syn)
            scale = 1 / math.sqrt(feat_syn.shape[1])
            pred = krr_predict(feat_syn * scale, syn_targets, feat_real * scale, self.reg)
            loss = ((pred - real_targets) ** 2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done = it + 1
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if self.time_budget is not None and time.perf_counter() - start > self.time_budget:
                stopped_by = "time_budget"
                break
        bar.close()
        if self.learn_labels:
            probs = torch.zeros(syn.shape[0], num_classes)
            probs[:, torch.tensor(classes)] = logits.detach().softmax(1).cpu()
            out_labels = probs
        else:
            out_labels = syn_class.clone()
        extra = {"iterations_done": done, "stopped_by": stopped_by, "final_loss": round(float(loss.detach()), 6)}
        return DistillResult(syn.detach().clone(), out_labels, syn_class, extra)
