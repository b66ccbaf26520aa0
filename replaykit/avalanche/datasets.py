"""Between Avalanche datasets and tensors: the data of an experience, and held images as a dataset to replay."""

from __future__ import annotations

from typing import Any

import torch
from avalanche.benchmarks.utils import AvalancheDataset
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["dataset_tensors", "replay_transform"]


def dataset_tensors(dataset: AvalancheDataset, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of an Avalanche classification dataset, with its eval transforms."""
    data = dataset.eval() if hasattr(dataset, "eval") else dataset
    collate = getattr(data, "collate_fn", None)
    xs, ys = [], []
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate):
        xs.append(torch.as_tensor(batch[0]).float())
        ys.append(torch.as_tensor(batch[1]).long().reshape(-1))
    if not xs:
        raise ValueError("the experience has no training data to distill")
    return torch.cat(xs), torch.cat(ys)


class _LabelledImages(TensorDataset):
    """Tensor dataset with the ``targets`` list Avalanche's classification datasets need;
    ``transform`` (e.g. :class:`replaykit.augment.ReplayAugment`) is applied to each image as it is drawn."""

    def __init__(self, images: torch.Tensor, class_ids: torch.Tensor, transform: Any = None) -> None:
        super().__init__(images, class_ids)
        self.targets = [int(c) for c in class_ids]
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = super().__getitem__(index)
        return (image if self.transform is None else self.transform(image)), target


def replay_transform(augment: bool, dataset: str | None, seed: int) -> Any:
    """The per-image transform of replayed samples: DSA's for the dataset when ``augment``, else none."""
    if not augment:
        return None
    from ..augment import ReplayAugment

    return ReplayAugment(dataset, seed=seed)
