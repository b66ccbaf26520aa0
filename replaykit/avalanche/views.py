"""Mixed-view training: a share of every mini-batch shown as a lossy buffer would give it back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from avalanche.training.plugins import SupervisedPlugin

from .. import codecs
from ..typed import check_positive_int

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate

__all__ = ["MixedViewPlugin", "MixedResolutionPlugin", "low_resolution_view", "mix_view"]


def low_resolution_view(images: torch.Tensor, factor: int) -> torch.Tensor:
    """``images`` as a buffer held at ``1/factor`` resolution would give them back: average-pooled, then decoded."""
    return codecs.upsample(torch.nn.functional.avg_pool2d(images, factor), factor)


class MixedViewPlugin(SupervisedPlugin):
    """Train on a random share ``p`` of every mini-batch as a lossy buffer gives images back.

    A buffer that holds images lossily (at reduced resolution, as JPEG) replays *degraded*
    images of the old classes while the new classes arrive clean: under long training the
    degradation alone tells new from old, and at test time the (clean) old-class images are
    taken for new classes. Showing a share of each training mini-batch through the same codec
    (``view``: normalised images -> what the buffer would give back, or ``None`` when there is
    nothing to imitate) removes that shortcut. Evaluation is untouched.
    :class:`DistilledReplayPlugin` does this by itself (``mix``).
    """

    def __init__(self, view: Callable[[torch.Tensor], torch.Tensor | None], p: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p!r}")
        self.view, self.p = view, float(p)
        self._gen = torch.Generator().manual_seed(seed * 7_777 + 11)

    def before_forward(self, strategy: "SupervisedTemplate", **kwargs: Any) -> None:
        mix_view(strategy, self.view, self.p, self._gen)


class MixedResolutionPlugin(MixedViewPlugin):
    """:class:`MixedViewPlugin` for a buffer held at ``1/factor`` resolution (:func:`low_resolution_view`)."""

    def __init__(self, factor: int = 2, p: float = 0.5, seed: int = 0) -> None:
        check_positive_int("factor", factor)
        # full-resolution float storage at 1/factor: the view pools and upsamples (None at factor 1 or when it does not divide)
        super().__init__(codecs.compose(factor, codecs.make("float32")).view, p, seed)
        self.factor = factor


def mix_view(strategy: "SupervisedTemplate", view: Callable[[torch.Tensor], torch.Tensor | None], p: float,
             gen: torch.Generator) -> None:
    """Replace a random share ``p`` of the current training mini-batch's images by ``view`` of them."""
    x = strategy.mbatch[0]
    if p == 0 or x.ndim != 4:
        return
    pick = torch.rand(x.shape[0], generator=gen) < p  # drawn on the host: the same share on every device
    if not pick.any():
        return
    pick = pick.to(x.device, non_blocking=True)
    viewed = view(x[pick])
    if viewed is not None:
        x = x.clone()
        x[pick] = viewed.to(x.device, x.dtype)
        strategy.mbatch[0] = x
